//! The one place where failures become HTTP responses:
//! `{"message": "<human text>", "error": "<machine_code>"}` with a fitting
//! status.

use crate::relay::coordinator::{CommandError, CoordinatorError, EvictError};
use axum::Json;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::relay::ConnectError;
use crate::relay::ids::ChannelId;
use crate::relay::registry::CreateError;
use crate::ws::handshake::HandshakeError;

/// Largest request body accepted, in bytes.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// An API failure.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    header: Option<(HeaderName, HeaderValue)>,
}

/// Every error response's body.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong, for humans; names the field at fault.
    #[schema(
        example = "field \"clientLimit\" must be -1 (unlimited) or an integer from 1 to 1000000"
    )]
    pub message: String,
    /// A stable machine-readable code.
    #[schema(example = "invalid_field")]
    pub error: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            header: None,
        }
    }

    /// The same error with another text.
    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.message = message.into();
        self
    }

    fn with_header(self, name: HeaderName, value: &'static str) -> Self {
        self.with_header_value(name, HeaderValue::from_static(value))
    }

    fn with_header_value(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.header = Some((name, value));
        self
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn code(&self) -> &'static str {
        self.code
    }

    /// The close code that carries this refusal to a browser, which cannot
    /// see the status of a refused upgrade (SPEC §5): 4000 + the status for
    /// 401, 404 and 409; 1013 (try again later) for 503. `None` for
    /// failures of the handshake itself, which keep their status.
    pub fn close_code(&self) -> Option<u16> {
        match self.status {
            StatusCode::UNAUTHORIZED | StatusCode::NOT_FOUND | StatusCode::CONFLICT => {
                Some(4000 + self.status.as_u16())
            }
            StatusCode::SERVICE_UNAVAILABLE => Some(crate::ws::codec::close_code::TRY_AGAIN_LATER),
            _ => None,
        }
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn channel_not_found(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "channel_not_found",
            format!("channel {id:?} does not exist"),
        )
    }

    /// 503: the cluster's shared store cannot be reached.
    pub fn cluster_unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "cluster_unavailable",
            "the cluster's shared store (NATS) cannot be reached right now; try again or use another node",
        )
        .with_header(header::RETRY_AFTER, "1")
    }

    /// 400 naming the field at fault.
    pub fn invalid_field(field: &str, requirement: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            format!("field {field:?} {requirement}"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(ErrorBody {
            message: self.message,
            error: self.code.to_owned(),
        });
        let mut response = (self.status, body).into_response();
        if let Some((name, value)) = self.header {
            response.headers_mut().insert(name, value);
        }
        response
    }
}

impl From<CreateError> for ApiError {
    fn from(error: CreateError) -> Self {
        match error {
            CreateError::TooManyChannels { .. } => Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_channels",
                error.to_string(),
            ),
            CreateError::IdsExhausted => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "ids_exhausted",
                error.to_string(),
            ),
        }
    }
}

/// Maps a refused connection, naming the channel where that helps.
pub fn connect_error(error: ConnectError, id: &ChannelId) -> ApiError {
    match error {
        ConnectError::Draining => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "this node is shutting down; connect again (another node will take you)",
        )
        .with_header(header::RETRY_AFTER, "1"),
        ConnectError::NotFound => ApiError::channel_not_found(id.as_str()),
        ConnectError::MissingToken => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing_token",
            "connecting needs the channel's token: /channels/{id}/connect?token=TOKEN",
        ),
        ConnectError::WrongToken => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_token",
            "wrong token for this channel",
        ),
        ConnectError::Unavailable => ApiError::cluster_unavailable(),
        ConnectError::Overloaded { max } => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            format!("this node holds its most connections ({max}); connect again (another node will take you)"),
        )
        .with_header(header::RETRY_AFTER, "1"),
        ConnectError::TooFast { wait } => {
            let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "connect_rate_exceeded",
                "connects arrive faster than this node takes them; connect again shortly",
            )
            .with_header_value(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)))
        }
        ConnectError::Full { limit } => ApiError::new(
            StatusCode::CONFLICT,
            "channel_full",
            format!("channel {id} is full: its clientLimit is {limit}"),
        ),
    }
}

impl From<CoordinatorError> for ApiError {
    fn from(error: CoordinatorError) -> Self {
        tracing::warn!(%error, "cluster operation failed");
        Self::cluster_unavailable()
    }
}

impl From<CommandError> for ApiError {
    fn from(error: CommandError) -> Self {
        match error {
            CommandError::NotFound(node) => Self::new(
                StatusCode::NOT_FOUND,
                "node_not_found",
                format!("no live node {node:?} in this cluster"),
            ),
            CommandError::ShuttingDown => Self::new(
                StatusCode::CONFLICT,
                "shutting_down",
                "the node is shutting down; its drain cannot be ended",
            ),
            CommandError::Unavailable(reason) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "cluster_unavailable",
                format!("the node cannot be reached: {reason}"),
            )
            .with_header(header::RETRY_AFTER, "1"),
        }
    }
}

impl From<EvictError> for ApiError {
    fn from(error: EvictError) -> Self {
        match error {
            EvictError::NotFound(node) => Self::new(
                StatusCode::NOT_FOUND,
                "node_not_found",
                format!("no node {node:?} in this cluster"),
            ),
            EvictError::Itself => Self::new(
                StatusCode::CONFLICT,
                "cannot_evict_self",
                "a node cannot evict itself; stop it (it leaves the cluster gracefully) or ask another node",
            ),
            EvictError::Unavailable(error) => error.into(),
        }
    }
}

impl From<crate::relay::RelayError> for ApiError {
    fn from(error: crate::relay::RelayError) -> Self {
        match error {
            crate::relay::RelayError::Create(error) => error.into(),
            crate::relay::RelayError::Shared(error) => error.into(),
        }
    }
}

impl From<HandshakeError> for ApiError {
    fn from(error: HandshakeError) -> Self {
        match error {
            HandshakeError::NotAnUpgrade => Self::new(
                StatusCode::UPGRADE_REQUIRED,
                "upgrade_required",
                error.to_string(),
            )
            .with_header(header::UPGRADE, "websocket"),
            HandshakeError::UnsupportedVersion => Self::new(
                StatusCode::UPGRADE_REQUIRED,
                "unsupported_websocket_version",
                error.to_string(),
            )
            .with_header(header::SEC_WEBSOCKET_VERSION, "13"),
            HandshakeError::BadKey => Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_handshake",
                error.to_string(),
            ),
        }
    }
}

impl From<BytesRejection> for ApiError {
    fn from(rejection: BytesRejection) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("request body is larger than {MAX_BODY_BYTES} bytes"),
            )
        } else {
            Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                format!("could not read the request body: {rejection}"),
            )
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_path",
            rejection.body_text(),
        )
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            rejection.body_text(),
        )
    }
}
