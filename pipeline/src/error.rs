//! tidepool's error type: one enum, classified by whose fault it is.

use std::path::{Path, PathBuf};

/// `Result` with tidepool's [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Who has to act on an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorDomain {
    /// The user's input or configuration is wrong; retrying the same thing fails again.
    User,
    /// Something outside tidepool failed (disk, network); a retry may succeed.
    External,
    /// tidepool broke one of its own invariants: a bug.
    Internal,
}

/// Everything that can go wrong in tidepool's libraries.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file involved.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// A configuration value is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Input data is malformed in a way that stops the job (without a skip policy).
    #[error("{location}: {reason}")]
    BadInput {
        /// Where: file and line or row.
        location: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A connector's client library failed (Parquet, CSV, Arrow).
    #[error("{context}: {message}")]
    Connector {
        /// What tidepool was doing.
        context: String,
        /// The library's message.
        message: String,
    },
    /// A broken invariant inside tidepool.
    #[error("internal error (likely a bug in tidepool): {0}")]
    Internal(String),
}

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    /// Wraps a client library's error with what tidepool was doing.
    pub fn connector(context: impl Into<String>, error: impl std::fmt::Display) -> Self {
        Error::Connector {
            context: context.into(),
            message: error.to_string(),
        }
    }

    /// Whose fault the error is, which decides whether retrying makes sense.
    pub fn domain(&self) -> ErrorDomain {
        match self {
            Error::Config(_) | Error::BadInput { .. } => ErrorDomain::User,
            Error::Io { .. } | Error::Connector { .. } => ErrorDomain::External,
            Error::Internal(_) => ErrorDomain::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_stays_small() {
        // Errors travel through Result on hot paths: keep them a few words wide.
        assert!(std::mem::size_of::<Error>() <= 56);
    }

    #[test]
    fn messages_name_the_place() {
        let e = Error::BadInput {
            location: "ratings.csv:12".into(),
            reason: "user id \"x\" is not an unsigned integer".into(),
        };
        assert_eq!(
            e.to_string(),
            "ratings.csv:12: user id \"x\" is not an unsigned integer"
        );
        assert_eq!(e.domain(), ErrorDomain::User);
        let e = Error::Internal("stash out of order".into());
        assert!(e.to_string().contains("bug"));
    }
}
