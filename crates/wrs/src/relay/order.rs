//! The clients of a channel in join order, with joining, leaving, finding
//! a client's position and the client at a position all in O(log n).
//!
//! Round-robin routing and `GET /channels/{id}/clients` need join order
//! and positions. An ordered map that shifts its entries on removal makes
//! every leave O(n): a mass leave from a channel of tens of thousands of
//! clients (a node draining, a deleted page) then costs O(n²) under the
//! channel's write lock. Here a leave only marks its slot empty; a Fenwick
//! tree over the slots counts the clients before any slot, and the slots
//! are compacted once the empty ones outnumber the clients (amortised
//! O(1) per leave).

use std::collections::HashMap;

use super::ids::ClientId;

/// Slots below this are never compacted: rebuilding is not worth it.
const COMPACT_FROM: usize = 64;

/// Values keyed by client id, in the order they were inserted.
#[derive(Debug)]
pub struct JoinOrder<V> {
    /// Insertion order; `None` where a client left.
    slots: Vec<Option<V>>,
    /// Where each present client sits in `slots`.
    slot_of: HashMap<ClientId, usize>,
    /// Fenwick tree over `slots` counting present clients: node `k`
    /// (1-based) is `tree[k - 1]` and covers slots `k - lowbit(k) .. k`.
    tree: Vec<u32>,
}

impl<V> Default for JoinOrder<V> {
    fn default() -> Self {
        Self {
            slots: Vec::new(),
            slot_of: HashMap::new(),
            tree: Vec::new(),
        }
    }
}

fn lowbit(k: usize) -> usize {
    k & k.wrapping_neg()
}

impl<V> JoinOrder<V> {
    pub fn len(&self) -> usize {
        self.slot_of.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slot_of.is_empty()
    }

    pub fn contains_key(&self, id: &ClientId) -> bool {
        self.slot_of.contains_key(id)
    }

    pub fn get(&self, id: &ClientId) -> Option<&V> {
        self.slots[*self.slot_of.get(id)?].as_ref()
    }

    /// Appends `value` under `id`; an `id` already present keeps its
    /// position and gets the new value.
    pub fn insert(&mut self, id: ClientId, value: V) {
        if let Some(&slot) = self.slot_of.get(&id) {
            self.slots[slot] = Some(value);
            return;
        }
        let slot = self.slots.len();
        self.slots.push(Some(value));
        self.slot_of.insert(id, slot);
        // The new node k covers slots k - lowbit(k) .. k: the ones before
        // it in that range, plus itself.
        let k = slot + 1;
        let below = self.prefix(k - 1) - self.prefix(k - lowbit(k));
        self.tree.push(below + 1);
    }

    /// Removes `id`, keeping everyone else's order.
    pub fn remove(&mut self, id: &ClientId) -> Option<V> {
        let slot = self.slot_of.remove(id)?;
        let value = self.slots[slot].take()?;
        let mut k = slot + 1;
        while k <= self.tree.len() {
            self.tree[k - 1] -= 1;
            k += lowbit(k);
        }
        let holes = self.slots.len() - self.slot_of.len();
        if self.slots.len() >= COMPACT_FROM && holes > self.slot_of.len() {
            self.compact();
        }
        Some(value)
    }

    /// The position of `id` among the present values (0 = joined first).
    pub fn position(&self, id: &ClientId) -> Option<usize> {
        let slot = *self.slot_of.get(id)?;
        Some(self.prefix(slot) as usize)
    }

    /// The value at `position` among the present values.
    pub fn get_index(&self, position: usize) -> Option<&V> {
        if position >= self.len() {
            return None;
        }
        // Descend the tree: the largest prefix of slots holding at most
        // `position` present values; the slot right after it is the one.
        let mut wanted = u32::try_from(position).ok()? + 1;
        let mut k = 0;
        let mut step = self.tree.len().checked_ilog2().map_or(0, |log| 1 << log);
        while step > 0 {
            let next = k + step;
            if next <= self.tree.len() && self.tree[next - 1] < wanted {
                k = next;
                wanted -= self.tree[next - 1];
            }
            step >>= 1;
        }
        self.slots.get(k)?.as_ref()
    }

    /// The values in insertion order.
    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.slots.iter().flatten()
    }

    /// How many values sit in slots before `slots[end]`.
    fn prefix(&self, end: usize) -> u32 {
        let mut sum = 0;
        let mut k = end;
        while k > 0 {
            sum += self.tree[k - 1];
            k -= lowbit(k);
        }
        sum
    }

    /// Drops the empty slots and rebuilds the index and the tree.
    fn compact(&mut self) {
        // A client's new slot is the number of clients before its old one.
        let mut slot_of = std::mem::take(&mut self.slot_of);
        for slot in slot_of.values_mut() {
            *slot = self.prefix(*slot) as usize;
        }
        self.slot_of = slot_of;
        self.slots.retain(Option::is_some);
        let n = self.slots.len();
        self.tree.clear();
        self.tree.resize(n, 1);
        for k in 1..=n {
            let parent = k + lowbit(k);
            if parent <= n {
                self.tree[parent - 1] += self.tree[k - 1];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator, so failures reproduce.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self, below: usize) -> usize {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((self.0 >> 33) % below as u64) as usize
        }
    }

    fn check(order: &JoinOrder<u64>, model: &[(ClientId, u64)]) {
        assert_eq!(order.len(), model.len());
        assert_eq!(order.is_empty(), model.is_empty());
        let values: Vec<u64> = order.values().copied().collect();
        let expected: Vec<u64> = model.iter().map(|(_, v)| *v).collect();
        assert_eq!(values, expected);
        for (position, (id, value)) in model.iter().enumerate() {
            assert_eq!(order.position(id), Some(position));
            assert_eq!(order.get_index(position), Some(value));
            assert_eq!(order.get(id), Some(value));
            assert!(order.contains_key(id));
        }
        assert_eq!(order.get_index(model.len()), None);
    }

    #[test]
    fn keeps_insertion_order_through_removals_like_an_ordered_list() {
        for seed in 1..=20 {
            let mut rng = Lcg(seed);
            let mut order = JoinOrder::default();
            let mut model: Vec<(ClientId, u64)> = Vec::new();
            let mut next_value = 0;
            for step in 0..3000 {
                // Phases that grow, shrink to almost nothing, and grow again,
                // so compaction runs at many sizes.
                let grow = (step / 500) % 2 == 0;
                if model.is_empty() || rng.next(10) < if grow { 7 } else { 2 } {
                    let id = ClientId::from_raw(next_value * 7 + 1);
                    order.insert(id, next_value);
                    model.push((id, next_value));
                    next_value += 1;
                } else {
                    let (id, value) = model.remove(rng.next(model.len()));
                    assert_eq!(order.remove(&id), Some(value));
                    assert_eq!(order.remove(&id), None);
                    assert_eq!(order.position(&id), None);
                    assert_eq!(order.get(&id), None);
                }
                if step % 97 == 0 {
                    check(&order, &model);
                }
            }
            check(&order, &model);
            assert!(order.slots.len() <= (2 * order.len()).max(COMPACT_FROM));
        }
    }

    /// `n` ids, inserted in order with the values 0, 1, 2, …
    fn filled(n: u64) -> (JoinOrder<usize>, Vec<ClientId>) {
        let mut order = JoinOrder::default();
        let ids: Vec<ClientId> = (1..=n).map(ClientId::from_raw).collect();
        for (value, id) in ids.iter().enumerate() {
            order.insert(*id, value);
        }
        (order, ids)
    }

    #[test]
    fn inserting_a_present_id_keeps_its_place() {
        let (mut order, ids) = filled(3);
        order.insert(ids[0], 10);
        assert_eq!(order.values().copied().collect::<Vec<_>>(), [10, 1, 2]);
        assert_eq!(order.position(&ids[0]), Some(0));
    }

    #[test]
    fn an_emptied_order_starts_over() {
        let (mut order, ids) = filled(200);
        for (value, id) in ids.iter().enumerate() {
            assert_eq!(order.remove(id), Some(value));
        }
        assert!(order.is_empty());
        assert!(order.slots.len() < COMPACT_FROM);
        assert_eq!(order.get_index(0), None);
        order.insert(ids[5], 5);
        assert_eq!(order.position(&ids[5]), Some(0));
        assert_eq!(order.get_index(0), Some(&5));
    }
}
