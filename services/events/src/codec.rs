//! Two encodings, chosen per message by its `Content-Type` header: JSON for what outsiders
//! publish or read (CI, CLI), MessagePack for high-volume internal traffic.

use serde::{Serialize, de::DeserializeOwned};

/// Header naming the payload's encoding.
pub const CONTENT_TYPE: &str = "Content-Type";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Json,
    MsgPack,
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("unsupported content type {0:?}")]
    UnsupportedContentType(String),
    #[error("invalid JSON payload: {0}")]
    Json(#[from] serde_json::Error),
    #[error("invalid MessagePack payload: {0}")]
    MsgPack(#[from] rmp_serde::decode::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("cannot encode as JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("cannot encode as MessagePack: {0}")]
    MsgPack(#[from] rmp_serde::encode::Error),
}

impl Encoding {
    pub fn content_type(self) -> &'static str {
        match self {
            Encoding::Json => "application/json",
            Encoding::MsgPack => "application/msgpack",
        }
    }

    /// A message without the header is JSON: that is what a person or a shell script sends.
    pub fn from_content_type(value: Option<&str>) -> Result<Self, DecodeError> {
        match value.map(str::trim) {
            None | Some("") | Some("application/json") => Ok(Encoding::Json),
            Some("application/msgpack") | Some("application/x-msgpack") => Ok(Encoding::MsgPack),
            Some(other) => Err(DecodeError::UnsupportedContentType(other.to_string())),
        }
    }

    pub fn encode<T: Serialize>(self, value: &T) -> Result<Vec<u8>, EncodeError> {
        Ok(match self {
            Encoding::Json => serde_json::to_vec(value)?,
            // Named fields, so a reader with an added optional field still decodes old messages.
            Encoding::MsgPack => rmp_serde::to_vec_named(value)?,
        })
    }

    pub fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, DecodeError> {
        Ok(match self {
            Encoding::Json => serde_json::from_slice(bytes)?,
            Encoding::MsgPack => rmp_serde::from_slice(bytes)?,
        })
    }
}

/// Decodes a payload according to its `Content-Type` header value.
pub fn decode<T: DeserializeOwned>(
    content_type: Option<&str>,
    bytes: &[u8],
) -> Result<T, DecodeError> {
    Encoding::from_content_type(content_type)?.decode(bytes)
}

/// The wire name of a unit enum value as serde spells it (`RejectCode::TooLarge` →
/// `too_large`, `HistoryKind::RolloutHalted` → `rollout.halted`): the one spelling events,
/// schemas, logs, metric labels and the CLI share.
pub fn wire_name<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        _ => "unknown".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::ReleasePublished;

    fn sample() -> ReleasePublished {
        ReleasePublished {
            app: "collector".into(),
            version: semver::Version::new(1, 2, 3),
            object: "collector-1.2.3.zip".into(),
            size: 42,
            blake3: "ab".repeat(32),
            published_by: Some("ci".into()),
        }
    }

    #[test]
    fn both_encodings_round_trip() {
        for enc in [Encoding::Json, Encoding::MsgPack] {
            let bytes = enc.encode(&sample()).expect("encode");
            let back: ReleasePublished = decode(Some(enc.content_type()), &bytes).expect("decode");
            assert_eq!(back, sample());
        }
    }

    #[test]
    fn missing_header_means_json_and_unknown_is_refused() {
        let bytes = Encoding::Json.encode(&sample()).expect("encode");
        assert!(decode::<ReleasePublished>(None, &bytes).is_ok());
        assert!(matches!(
            decode::<ReleasePublished>(Some("text/xml"), &bytes),
            Err(DecodeError::UnsupportedContentType(_))
        ));
        assert!(matches!(
            decode::<ReleasePublished>(None, b"{not json"),
            Err(DecodeError::Json(_))
        ));
        assert!(matches!(
            decode::<ReleasePublished>(Some("application/msgpack"), b"\xc1"),
            Err(DecodeError::MsgPack(_))
        ));
    }
}
