//! Newtype ids that appear in clear event headers. None of them is derived from health data:
//! chart ids, event ids and key ids are random UUIDs.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub struct $name(pub Uuid);

        impl $name {
            /// Generates a new random (version 4) id.
            pub fn random() -> Self {
                Self(Uuid::new_v4())
            }

            /// Returns the 16 bytes of the id, the form used in storage keys.
            pub fn as_bytes(&self) -> &[u8; 16] {
                self.0.as_bytes()
            }

            /// Builds the id from its 16 bytes.
            pub fn from_bytes(bytes: [u8; 16]) -> Self {
                Self(Uuid::from_bytes(bytes))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = uuid::Error;

            fn from_str(text: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(text).map(Self)
            }
        }
    };
}

uuid_id!(
    /// Id of a chart: the event stream of one patient's compartment, or of the shared directory.
    ChartId
);
uuid_id!(
    /// Id of one event, unique across the whole log.
    EventId
);
uuid_id!(
    /// Id of a chart's data key, named in each header so a reader knows which key to unwrap.
    KeyId
);
uuid_id!(
    /// Id a client gives a command so that a retried command is applied once.
    CommandId
);

impl ChartId {
    /// The chart that holds resources outside every patient compartment (Organization,
    /// Practitioner, Location, Medication and the like). A fixed id, so every node agrees on it.
    pub const DIRECTORY: ChartId =
        ChartId(Uuid::from_u128(0x0000_0000_0000_4000_8000_0000_0000_0001));
}

/// Sequence number of an event within its chart, starting at 1 and without gaps.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Debug)]
pub struct EventSeq(pub u64);

impl EventSeq {
    /// The sequence number of a chart's first event.
    pub const FIRST: EventSeq = EventSeq(1);

    /// Returns the sequence number that follows this one.
    pub fn next(self) -> EventSeq {
        EventSeq(self.0 + 1)
    }
}

impl fmt::Display for EventSeq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Id of a node's Ed25519 signing key: the first 8 bytes of the BLAKE3 digest of its public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SignerId(pub [u8; 8]);

impl SignerId {
    /// Derives the id of a signing key from its 32-byte Ed25519 public key.
    pub fn from_public_key(public_key: &[u8; 32]) -> SignerId {
        let digest = blake3::hash(public_key);
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest.as_bytes()[..8]);
        SignerId(id)
    }
}

impl fmt::Display for SignerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for SignerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SignerId({self})")
    }
}
