//! Chartlog: an event-sourced clinical record store.
//!
//! Every change to a patient's chart becomes an event whose payload is encrypted under the
//! chart's data key, chained to the chart's previous event by a BLAKE3 digest, signed by the
//! node's Ed25519 key and appended to the log. Read models are built from the log, and every
//! read of health data is itself an event.
//!
//! Modules, in reading order:
//!
//! - [`command`]: commands, the writer's state, and how commands become planned events.
//! - [`crypto`]: sealing and opening envelopes; the key store.
//! - [`log`]: the append-only log interface and the embedded RocksDB log.
//! - [`writer`]: the thread that seals and appends batches of commands (group commit).
//! - [`projector`]: applies the log to the chart projection.
//! - [`node`]: opens a data directory and starts the writer and projector.
//! - [`fhir`]: FHIR R4 validation, compartments and search.
//! - [`auth`]: bearer tokens and roles.
//! - [`api`]: the HTTP API.
//! - [`config`]: settings from flags, environment and file.
//! - [`verify`]: offline verification of a whole log.

#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod command;
pub mod config;
pub mod crypto;
pub mod fhir;
pub mod journal;
pub mod log;
pub mod node;
pub mod projector;
pub mod verify;
pub mod writer;

/// Formats an error and its causes on one line for the command line, leaving out a cause that
/// only repeats the text before it, as Kafka client errors do.
pub fn one_line(error: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if parts.last().is_some_and(|last| last.contains(&text)) {
            continue;
        }
        parts.push(text);
    }
    parts.join(": ").replace('\n', " ")
}

/// Parses the command line of `program`. A usage error prints one line and exits with
/// status 2, like every other command-line error. Help and version print as clap formats them.
pub fn parse_command_line<T: clap::Parser>(program: &str) -> T {
    match T::try_parse() {
        Ok(parsed) => parsed,
        Err(error) => {
            use clap::error::ErrorKind;
            if matches!(
                error.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                error.exit();
            }
            let text = error.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("{program}: {first}; see {program} --help");
            std::process::exit(2);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn repeated_cause_is_left_out() {
        let inner = anyhow::anyhow!("BrokerTransportFailure (Local: Broker transport failure)");
        let error = inner
            .context("BrokerTransportFailure (Local: Broker transport failure)")
            .context("kafka topic creation failed");
        assert_eq!(
            super::one_line(&error),
            "kafka topic creation failed: BrokerTransportFailure (Local: Broker transport failure)"
        );
    }
}
