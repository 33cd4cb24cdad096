//! `dataplane`: see `dataplane --help`.
use std::process::ExitCode;

use clap::Parser;
use dataplane::{
    config::{CaCommand, Cli, CniCommand, Command, LogFormat, RunArgs},
    identity::ca,
};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version: printed in full, exit 0
        Err(e) => {
            // One line naming the flag and the reason, exit code 2 (clap adds
            // usage and a tip on further lines; `--help` has those).
            let text = e.render().to_string();
            let line: Vec<&str> =
                text.lines().take_while(|l| !l.trim().is_empty() && !l.starts_with("Usage:")).map(str::trim).collect();
            eprintln!("{}", line.join(" "));
            return ExitCode::from(2);
        }
    };
    init_logs(matches!(&cli.command, Command::Run(a) if a.log_format == LogFormat::Json));
    match cli.command {
        Command::Run(args) if args.check_config => check_config(&args),
        Command::Run(args) => run(*args),
        Command::Issuer(args) => issuer(args),
        Command::Uninstall(args) => match uninstall(args) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => failed(e),
        },
        Command::Cni(cmd) => cni(cmd).map_or_else(failed, |()| ExitCode::SUCCESS),
        Command::Ca(cmd) => {
            let result = match cmd {
                CaCommand::Init { dir } => ca::init(&dir),
                CaCommand::Issue { dir, ip, days, not_before_days } => {
                    ca::issue(&dir, ip, ca::Validity { not_before_days, days })
                }
            };
            result.map_or_else(
                |e| {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                },
                |()| ExitCode::SUCCESS,
            )
        }
    }
}

/// Logs to stderr, as JSON lines or text (coloured on a terminal unless
/// `NO_COLOR`), filtered by `RUST_LOG` (default info).
fn init_logs(json: bool) {
    let logs = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr);
    if json {
        logs.json().init();
    } else {
        let color = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
        logs.with_ansi(color).init();
    }
}

/// A failure after start: its chain on one line, exit code 1.
fn failed(e: anyhow::Error) -> ExitCode {
    eprintln!("error: {e:#}");
    ExitCode::FAILURE
}

/// A configuration refused: exit code 2.
fn refused(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(2)
}

/// `dataplane run --check-config`: the flags and values, nothing contacted.
fn check_config(args: &RunArgs) -> ExitCode {
    let unknown = dataplane::config::unknown_env_settings();
    match args.check_values() {
        Ok(()) if !unknown.is_empty() => refused(format_args!(
            "{}: no such setting (see dataplane run --help for the DATAPLANE_* variables)",
            unknown.join(", ")
        )),
        Ok(()) => {
            println!("configuration OK (flags and values; host paths are checked at start-up): {args:#?}");
            ExitCode::SUCCESS
        }
        Err(e) => refused(e),
    }
}

/// `dataplane run`.
fn run(args: RunArgs) -> ExitCode {
    for name in dataplane::config::unknown_env_settings() {
        tracing::warn!(variable = %name, "ignoring an environment variable no setting reads");
    }
    match args.validate() {
        Ok(cfg) => dataplane::control::run::run(cfg).map_or_else(failed, |()| ExitCode::SUCCESS),
        Err(e) => refused(e),
    }
}

/// `dataplane issuer`.
fn issuer(args: dataplane_issuer::IssuerArgs) -> ExitCode {
    let settings = match args.settings() {
        Ok(s) => s,
        Err(e) => return refused(e),
    };
    if args.check_config {
        println!("configuration OK (flags and values; nothing was contacted): {settings:#?}");
        return ExitCode::SUCCESS;
    }
    dataplane_issuer::run(settings).map_or_else(failed, |()| ExitCode::SUCCESS)
}

/// `dataplane uninstall`: every part, each reported; whether all went.
fn uninstall(args: dataplane::config::UninstallArgs) -> anyhow::Result<bool> {
    use dataplane::control::cni::install;
    let n = args.node;
    let node = install::Node { bin_dir: n.bin_dir, conf_dir: n.conf_dir, socket: n.socket };
    let mut ok = true;
    match install::uninstall(&node) {
        Ok(removed) => removed.iter().for_each(|p| println!("removed {}", p.display())),
        Err(e) => {
            ok = false;
            eprintln!("error: the CNI plugin: {e}");
        }
    }
    match dataplane::node::ebpf::unpin_all(&args.pin_dir) {
        Ok(removed) => removed.iter().for_each(|p| println!("removed {}", p.display())),
        Err(e) => {
            ok = false;
            eprintln!("error: the pins: {e}");
        }
    }
    match dataplane::control::uninstall::sweep_return_paths(&args.netns_dir) {
        Ok(swept) => {
            for p in &swept.cleaned {
                println!("removed the return path in {}", p.display());
            }
            for (p, why) in &swept.failed {
                ok = false;
                eprintln!("error: the return path in {}: {why}", p.display());
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            ok = false;
            eprintln!("error: {}: {e}", args.netns_dir.display());
        }
    }
    Ok(ok)
}

/// `dataplane cni install|uninstall`.
fn cni(cmd: CniCommand) -> anyhow::Result<()> {
    use dataplane::control::cni::install;
    let node =
        |n: dataplane::config::CniNode| install::Node { bin_dir: n.bin_dir, conf_dir: n.conf_dir, socket: n.socket };
    match cmd {
        CniCommand::Install { node: n, plugin, watch, removal, kube, kubeconfig } => {
            let plugin = match plugin {
                Some(p) => p,
                None => std::env::current_exe()?.with_file_name(install::PLUGIN),
            };
            let node = node(n);
            let access = dataplane_pki::api::Access::from_flags(kube, kubeconfig.as_deref());
            let daemonset = match (removal.daemonset, access) {
                (Some(ds), Some(access)) => Some((ds, access)),
                (Some(_), None) => anyhow::bail!("--daemonset needs --kube or --kubeconfig"),
                (None, _) => None,
            };
            if watch {
                let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
                    signal_hook::flag::register(sig, stop.clone())?;
                }
                let every = std::time::Duration::from_secs(2);
                install::watch(&node, &plugin, every, || stop.load(std::sync::atomic::Ordering::Relaxed))?;
                if let Some(((ns, name), access)) = daemonset {
                    use dataplane::control::uninstall::{daemonset_fate, Fate, ASK_WITHIN};
                    match daemonset_fate(&access, &ns, &name, ASK_WITHIN) {
                        Fate::Removed(why) => {
                            tracing::info!(daemonset = %format!("{ns}/{name}"), why, "taking the CNI plugin off the node");
                            for path in install::uninstall(&node)? {
                                tracing::info!(removed = %path.display(), "CNI plugin uninstalled");
                            }
                        }
                        Fate::Staying => {
                            tracing::info!("the DaemonSet stays (an update or a restart): the CNI plugin stays chained")
                        }
                        Fate::Unknown(why) => tracing::warn!(
                            why,
                            "could not tell whether the DaemonSet is being deleted: the CNI plugin stays chained \
                             (if it is, run `dataplane uninstall` on this node)"
                        ),
                    }
                }
            } else {
                let list = install::install(&node, &plugin)?;
                println!("chained after the primary CNI in {}", list.display());
            }
        }
        CniCommand::Uninstall { node: n } => {
            for path in install::uninstall(&node(n))? {
                println!("removed {}", path.display());
            }
        }
    }
    Ok(())
}
