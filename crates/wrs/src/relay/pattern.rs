//! Messaging patterns and the routing decision: who receives a message.
//!
//! [`route`] is a pure function of the pattern, the channel's roster, the
//! sender's position in it, what kind of frame was sent and the channel's
//! round-robin turn counter. Sockets never decide who receives what; the
//! coordinator only carries out the [`Receivers`] decided here.

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use super::ids::ClientId;

/// A channel's messaging pattern (SPEC §3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Pattern {
    Echo,
    PubSub,
    PushPull,
    ReqRepl,
    FanInOut,
}

impl Pattern {
    pub const ALL: [Pattern; 5] = [
        Pattern::Echo,
        Pattern::PubSub,
        Pattern::PushPull,
        Pattern::ReqRepl,
        Pattern::FanInOut,
    ];

    /// The name used in the API (`"pub-sub"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Pattern::Echo => "echo",
            Pattern::PubSub => "pub-sub",
            Pattern::PushPull => "push-pull",
            Pattern::ReqRepl => "req-repl",
            Pattern::FanInOut => "fan-in-out",
        }
    }

    pub fn parse(name: &str) -> Option<Pattern> {
        Pattern::ALL.into_iter().find(|p| p.as_str() == name)
    }

    /// Whether frames on this pattern follow the JSON request/reply
    /// sub-protocol instead of being relayed unchanged.
    pub fn uses_subprotocol(self) -> bool {
        matches!(self, Pattern::ReqRepl | Pattern::FanInOut)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the sender sent, as far as routing is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Intent {
    /// A frame on `echo`, `pub-sub` or `push-pull`: relayed unchanged.
    Plain,
    /// A sub-protocol request.
    Request,
    /// A sub-protocol reply addressed to the client that sent the request.
    Reply { origin: ClientId },
}

/// The receivers of one message, as positions in the roster the decision
/// was made on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Receivers {
    /// Nobody (a broadcast from a client that is alone).
    Nobody,
    /// The sender itself (`echo`, or a round-robin pattern with a lone sender).
    Sender,
    /// Every client except the sender.
    AllButSender,
    /// Exactly this one client.
    One(usize),
}

/// Why a frame cannot be routed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteError {
    /// A reply names an origin that is not connected to the channel.
    UnknownOrigin(ClientId),
}

/// The channel's connected clients in a stable order (join order).
pub trait Roster {
    fn len(&self) -> usize;
    fn position(&self, id: ClientId) -> Option<usize>;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Roster for [ClientId] {
    fn len(&self) -> usize {
        <[ClientId]>::len(self)
    }

    fn position(&self, id: ClientId) -> Option<usize> {
        self.iter().position(|&c| c == id)
    }
}

/// A monotonically advancing round-robin counter. Each call hands out the
/// next turn; concurrent senders on one channel share it.
pub trait Turns {
    fn next_turn(&self) -> u64;
}

impl Turns for AtomicU64 {
    fn next_turn(&self) -> u64 {
        self.fetch_add(1, Ordering::Relaxed)
    }
}

impl Turns for Cell<u64> {
    fn next_turn(&self) -> u64 {
        let turn = self.get();
        self.set(turn.wrapping_add(1));
        turn
    }
}

/// Decides who receives a message (SPEC §3).
///
/// `sender` is the sender's position in `roster`, or `None` for a
/// publisher outside the channel (HTTP publish, SPEC §10): for it "the
/// others" are every client, a round-robin pick skips nobody and `echo`
/// reaches nobody. The plain patterns (`echo`, `pub-sub`, `push-pull`)
/// ignore the intent; the sub-protocol patterns treat `Intent::Plain` like
/// a request.
///
/// # Errors
///
/// [`RouteError::UnknownOrigin`] when a reply names a client that is not in
/// the roster.
pub fn route<R, T>(
    pattern: Pattern,
    roster: &R,
    sender: Option<usize>,
    intent: Intent,
    turns: &T,
) -> Result<Receivers, RouteError>
where
    R: Roster + ?Sized,
    T: Turns + ?Sized,
{
    let others = roster.len() - usize::from(sender.is_some());
    let receivers = match (pattern, intent) {
        (Pattern::Echo, _) if sender.is_some() => Receivers::Sender,
        (Pattern::Echo, _) => Receivers::Nobody,
        (Pattern::PubSub, _) | (Pattern::ReqRepl, Intent::Plain | Intent::Request) => {
            if others == 0 {
                Receivers::Nobody
            } else {
                Receivers::AllButSender
            }
        }
        (Pattern::PushPull, _) | (Pattern::FanInOut, Intent::Plain | Intent::Request) => {
            match sender {
                _ if others > 0 => Receivers::One(round_robin(roster.len(), sender, turns)),
                Some(_) => Receivers::Sender,
                None => Receivers::Nobody,
            }
        }
        (Pattern::ReqRepl | Pattern::FanInOut, Intent::Reply { origin }) => {
            match roster.position(origin) {
                Some(position) => Receivers::One(position),
                None => return Err(RouteError::UnknownOrigin(origin)),
            }
        }
    };
    Ok(receivers)
}

/// Picks the next client in turn, skipping the sender (if it is one of
/// the `len`). A skip consumes a turn, so with one sender every other
/// client gets exactly one message per rotation. There is at least one
/// client besides the sender.
fn round_robin<T: Turns + ?Sized>(len: usize, sender: Option<usize>, turns: &T) -> usize {
    let first = (turns.next_turn() % len as u64) as usize;
    let Some(sender) = sender.filter(|&sender| sender == first) else {
        return first;
    };
    let len = len as u64;
    let second = (turns.next_turn() % len) as usize;
    if second != sender {
        second
    } else {
        // Only reachable when other senders took turns in between; stay
        // bounded rather than spin.
        (sender + 1) % len as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: u64) -> Vec<ClientId> {
        (1..=n).map(ClientId::from_raw).collect()
    }

    fn plain(pattern: Pattern, roster: &[ClientId], sender: usize, turns: &Cell<u64>) -> Receivers {
        route(pattern, roster, Some(sender), Intent::Plain, turns).unwrap()
    }

    #[test]
    fn pattern_names_round_trip() {
        for pattern in Pattern::ALL {
            assert_eq!(Pattern::parse(pattern.as_str()), Some(pattern));
            // The JSON name is the API name.
            assert_eq!(serde_json::to_value(pattern).unwrap(), pattern.as_str());
        }
        assert_eq!(Pattern::parse("pubsub"), None);
        assert_eq!(Pattern::parse("PUB-SUB"), None);
        assert!(Pattern::ReqRepl.uses_subprotocol());
        assert!(Pattern::FanInOut.uses_subprotocol());
        assert!(!Pattern::PushPull.uses_subprotocol());
    }

    #[test]
    fn echo_always_returns_to_the_sender() {
        let turns = Cell::new(0);
        for n in 1..=4 {
            let roster = ids(n);
            for sender in 0..roster.len() {
                assert_eq!(
                    plain(Pattern::Echo, &roster, sender, &turns),
                    Receivers::Sender
                );
            }
        }
        assert_eq!(turns.get(), 0, "echo must not consume turns");
    }

    #[test]
    fn pub_sub_broadcasts_to_others_and_nobody_when_alone() {
        let turns = Cell::new(0);
        assert_eq!(
            plain(Pattern::PubSub, &ids(1), 0, &turns),
            Receivers::Nobody
        );
        for n in 2..=5 {
            for sender in 0..n as usize {
                assert_eq!(
                    plain(Pattern::PubSub, &ids(n), sender, &turns),
                    Receivers::AllButSender
                );
            }
        }
    }

    #[test]
    fn push_pull_returns_to_a_lone_sender() {
        let turns = Cell::new(7);
        assert_eq!(
            plain(Pattern::PushPull, &ids(1), 0, &turns),
            Receivers::Sender
        );
        assert_eq!(turns.get(), 7, "a lone sender must not consume turns");
    }

    #[test]
    fn push_pull_rotates_fairly_and_never_picks_the_sender() {
        for n in 2..=6u64 {
            let roster = ids(n);
            for sender in 0..n as usize {
                let turns = Cell::new(0);
                let mut counts = vec![0u32; n as usize];
                let rotations = 50;
                for _ in 0..rotations * (n - 1) {
                    match plain(Pattern::PushPull, &roster, sender, &turns) {
                        Receivers::One(pos) => counts[pos] += 1,
                        other => panic!("unexpected {other:?}"),
                    }
                }
                for (pos, &count) in counts.iter().enumerate() {
                    let expected = if pos == sender { 0 } else { rotations as u32 };
                    assert_eq!(count, expected, "n={n} sender={sender} counts={counts:?}");
                }
            }
        }
    }

    #[test]
    fn push_pull_keeps_strict_order_within_a_rotation() {
        let roster = ids(4);
        let turns = Cell::new(0);
        let picks: Vec<_> = (0..6)
            .map(|_| plain(Pattern::PushPull, &roster, 0, &turns))
            .collect();
        use Receivers::One;
        assert_eq!(picks, [One(1), One(2), One(3), One(1), One(2), One(3)]);
    }

    #[test]
    fn round_robin_stays_bounded_when_other_senders_interleave() {
        // A counter that always lands on the sender: the fallback must pick
        // the next client instead of looping.
        struct Stuck;
        impl Turns for Stuck {
            fn next_turn(&self) -> u64 {
                4
            }
        }
        let roster = ids(4);
        assert_eq!(
            route(
                Pattern::PushPull,
                &roster[..],
                Some(0),
                Intent::Plain,
                &Stuck
            ),
            Ok(Receivers::One(1))
        );
        // Turn 4 of 4 lands on position 0, which is not this sender.
        assert_eq!(
            route(
                Pattern::FanInOut,
                &roster[..],
                Some(3),
                Intent::Request,
                &Stuck
            ),
            Ok(Receivers::One(0))
        );
    }

    #[test]
    fn req_repl_requests_reach_every_other_client() {
        let turns = Cell::new(0);
        let req = |roster: &[ClientId], sender| {
            route(
                Pattern::ReqRepl,
                roster,
                Some(sender),
                Intent::Request,
                &turns,
            )
        };
        assert_eq!(req(&ids(1), 0), Ok(Receivers::Nobody));
        assert_eq!(req(&ids(3), 1), Ok(Receivers::AllButSender));
        assert_eq!(turns.get(), 0);
    }

    #[test]
    fn fan_in_out_requests_rotate_like_push_pull() {
        let roster = ids(4);
        let turns = Cell::new(0);
        let mut counts = [0u32; 4];
        for _ in 0..300 {
            match route(
                Pattern::FanInOut,
                &roster[..],
                Some(2),
                Intent::Request,
                &turns,
            ) {
                Ok(Receivers::One(pos)) => counts[pos] += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(counts, [100, 100, 0, 100]);
        let lone = Cell::new(0);
        assert_eq!(
            route(
                Pattern::FanInOut,
                &ids(1)[..],
                Some(0),
                Intent::Request,
                &lone
            ),
            Ok(Receivers::Sender)
        );
    }

    #[test]
    fn replies_go_only_to_their_origin() {
        let roster = ids(4);
        let turns = Cell::new(0);
        for pattern in [Pattern::ReqRepl, Pattern::FanInOut] {
            for (pos, &origin) in roster.iter().enumerate() {
                for sender in 0..roster.len() {
                    assert_eq!(
                        route(
                            pattern,
                            &roster[..],
                            Some(sender),
                            Intent::Reply { origin },
                            &turns
                        ),
                        Ok(Receivers::One(pos))
                    );
                }
            }
            let stranger = ClientId::from_raw(99);
            assert_eq!(
                route(
                    pattern,
                    &roster[..],
                    Some(0),
                    Intent::Reply { origin: stranger },
                    &turns
                ),
                Err(RouteError::UnknownOrigin(stranger))
            );
        }
        assert_eq!(turns.get(), 0, "replies must not consume turns");
    }

    #[test]
    fn every_pattern_and_intent_combination_is_decided() {
        // Exhaustive over patterns, intents, roster sizes and senders: no
        // decision ever names a position outside the roster or the sender
        // itself through `One` unless the reply is addressed to it.
        for pattern in Pattern::ALL {
            for n in 1..=4u64 {
                let roster = ids(n);
                for sender in 0..n as usize {
                    let intents = [
                        Intent::Plain,
                        Intent::Request,
                        Intent::Reply { origin: roster[0] },
                        Intent::Reply {
                            origin: roster[sender],
                        },
                    ];
                    for intent in intents {
                        let turns = Cell::new(0);
                        for _ in 0..8 {
                            match route(pattern, &roster[..], Some(sender), intent, &turns) {
                                Ok(Receivers::One(pos)) => {
                                    assert!(pos < roster.len());
                                    let reply_to_self = matches!(intent, Intent::Reply { origin } if origin == roster[sender]);
                                    if !reply_to_self {
                                        assert_ne!(pos, sender, "{pattern} {intent:?}");
                                    }
                                }
                                Ok(_) => {}
                                Err(e) => panic!("{pattern} {intent:?}: {e:?}"),
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_publisher_outside_the_channel_reaches_every_client() {
        let turns = Cell::new(0);
        let outside = |pattern, roster: &[ClientId], intent| {
            route(pattern, roster, None, intent, &turns).unwrap()
        };
        for pattern in [Pattern::PubSub, Pattern::ReqRepl] {
            assert_eq!(
                outside(pattern, &ids(0), Intent::Request),
                Receivers::Nobody
            );
            assert_eq!(
                outside(pattern, &ids(1), Intent::Request),
                Receivers::AllButSender
            );
        }
        assert_eq!(
            outside(Pattern::Echo, &ids(3), Intent::Plain),
            Receivers::Nobody
        );
        for pattern in [Pattern::PushPull, Pattern::FanInOut] {
            assert_eq!(
                outside(pattern, &ids(0), Intent::Request),
                Receivers::Nobody
            );
            // A rotation over every client, nobody skipped.
            let picks: Vec<_> = (0..6)
                .map(|_| outside(pattern, &ids(3), Intent::Request))
                .collect();
            let start = match picks[0] {
                Receivers::One(p) => p,
                other => panic!("{other:?}"),
            };
            let expected: Vec<_> = (0..6).map(|i| Receivers::One((start + i) % 3)).collect();
            assert_eq!(picks, expected);
        }
    }

    #[test]
    fn atomic_turns_advance() {
        let turns = AtomicU64::new(5);
        assert_eq!(turns.next_turn(), 5);
        assert_eq!(turns.next_turn(), 6);
    }
}
