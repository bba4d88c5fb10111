//! The `chartlog` binary: `serve` runs the server, `token` mints development tokens.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chartlog::api::{self, AppState};
use chartlog::auth::{dev_issuer, Authenticator, IssuerConfig, Role};
use chartlog::config::{Overrides, ServeSettings, DEFAULT_DATA_DIR};
use chartlog::crypto::keystore::KeyPaths;
use chartlog::node::{Node, NodeConfig};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "chartlog",
    version,
    about = "Event-sourced clinical record store serving FHIR R4"
)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Starts the server, on the embedded RocksDB log by default or on Kafka.
    Serve {
        /// Data directory: log, projections and keys (created on first start).
        #[arg(long, env = "CHARTLOG_DATA")]
        data: Option<PathBuf>,
        /// Address to listen on, HOST:PORT [default: 127.0.0.1:8080].
        #[arg(long, env = "CHARTLOG_LISTEN")]
        listen: Option<String>,
        /// Key-encryption key file [default: DATA/keys/kek.key].
        #[arg(long, env = "CHARTLOG_KEY_FILE")]
        key_file: Option<PathBuf>,
        /// Base URL of the FHIR endpoint as clients reach it [default: http://LISTEN/fhir].
        #[arg(long, env = "CHARTLOG_BASE_URL")]
        base_url: Option<String>,
        /// TOML config file; flags and CHARTLOG_* variables take precedence over it.
        #[arg(long, env = "CHARTLOG_CONFIG")]
        config: Option<PathBuf>,
        /// Log backend: embedded (RocksDB in the data directory) or kafka (settings from
        /// CHARTLOG_KAFKA_* variables or the config file) [default: embedded].
        #[arg(long, env = "CHARTLOG_LOG_BACKEND")]
        log_backend: Option<String>,
    },
    /// Prints a JWT signed by the development issuer of a data directory. For development
    /// only: anyone who can read the data directory can mint tokens with any role.
    Token {
        /// Data directory whose development issuer signs the token.
        #[arg(long, env = "CHARTLOG_DATA", default_value = DEFAULT_DATA_DIR)]
        data: PathBuf,
        /// Subject id of the user or service (the `sub` claim); every event names it.
        #[arg(long)]
        sub: String,
        /// Role: physician, nurse, front-desk, billing, compliance-officer or administrator.
        /// Repeat for several roles.
        #[arg(long, required = true)]
        role: Vec<String>,
        /// Lifetime of the token in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CHARTLOG_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;

    tracing_subscriber::fmt()
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() {
    let cli: Cli = chartlog::parse_command_line("chartlog");
    let outcome = match cli.command {
        Commands::Serve {
            data,
            listen,
            key_file,
            base_url,
            config,
            log_backend,
        } => {
            init_tracing();
            let overrides = Overrides {
                data,
                listen,
                key_file,
                base_url,
                config,
                log_backend,
            };
            serve(overrides)
        }
        Commands::Token {
            data,
            sub,
            role,
            ttl,
        } => token(&data, &sub, &role, ttl),
    };
    if let Err(error) = outcome {
        eprintln!("chartlog: {}", chartlog::one_line(&error));
        std::process::exit(1);
    }
}

fn token(data: &std::path::Path, subject: &str, roles: &[String], ttl: u64) -> anyhow::Result<()> {
    for role in roles {
        if Role::from_name(role).is_none() {
            anyhow::bail!(
                "unknown role {role}; expected physician, nurse, front-desk, billing, compliance-officer or administrator"
            );
        }
    }
    if subject.trim().is_empty() {
        anyhow::bail!("--sub must not be empty");
    }
    // A mistyped directory would get an issuer of its own, whose tokens no server accepts.
    if !data.is_dir() {
        anyhow::bail!(
            "data directory {} does not exist; name the server's with --data",
            data.display()
        );
    }
    let key_dir = KeyPaths::under(data, None).dir;
    let issuer = dev_issuer::DevIssuer::open_or_create(&key_dir).with_context(|| {
        format!(
            "cannot open the development issuer key in {}",
            key_dir.display()
        )
    })?;
    let role_names: Vec<&str> = roles.iter().map(String::as_str).collect();
    let token = issuer.mint(subject, &role_names, Duration::from_secs(ttl))?;
    println!("{token}");
    Ok(())
}

fn serve(overrides: Overrides) -> anyhow::Result<()> {
    let settings = ServeSettings::resolve(overrides)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run_server(settings))
}

async fn run_server(settings: ServeSettings) -> anyhow::Result<()> {
    tracing::info!(
        data_dir = %settings.data_dir.display(),
        listen = %settings.listen,
        base_url = %settings.base_url,
        issuers = settings.issuers.len(),
        dev_issuer = settings.dev_issuer,
        "chartlog starting"
    );
    let node_config = NodeConfig {
        data_dir: settings.data_dir.clone(),
        kek_file: settings.key_file.clone(),
        kafka: settings.kafka.clone(),
        url: Some(settings.base_url.clone()),
    };
    let node = Node::open(&node_config).await?;

    let mut issuers: Vec<IssuerConfig> = settings.issuers.clone();
    if settings.dev_issuer {
        let key_dir = node_config.key_paths().dir;
        let issuer = dev_issuer::DevIssuer::open_or_create(&key_dir)?;
        let jwks_path = key_dir.join("dev-issuer-jwks.json");
        std::fs::write(&jwks_path, issuer.jwks_json())
            .with_context(|| format!("cannot write {}", jwks_path.display()))?;
        tracing::warn!(
            issuer = dev_issuer::ISSUER,
            key = %dev_issuer::DevIssuer::key_path(&key_dir).display(),
            "trusting the development token issuer; for development only, configure real issuers in production"
        );
        issuers.push(IssuerConfig {
            issuer: dev_issuer::ISSUER.into(),
            audience: dev_issuer::AUDIENCE.into(),
            jwks_file: Some(jwks_path),
            jwks_url: None,
        });
    }
    let authenticator = Arc::new(Authenticator::from_config(&issuers)?);

    let state = AppState::new(&node, authenticator, &settings.base_url);
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
    tracing::info!(listen = %settings.listen, "chartlog ready");
    axum::serve(
        listener,
        api::app(state).into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(async {
        // SIGTERM is how service managers and container runtimes ask a process to stop.
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(error) => {
                    tracing::warn!(error = %error, "cannot listen for SIGTERM; only Ctrl-C stops the server cleanly");
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = terminate => {}
        }
        tracing::info!("shutdown begun");
    })
    .await
    .context("server failed")?;
    node.shutdown().await;
    tracing::info!("shutdown finished");
    Ok(())
}
