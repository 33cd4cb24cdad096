//! `dataplane-cni`: a chained CNI plugin (CNI spec 1.0.0). The container
//! runtime runs it after the primary plugin has given a pod's sandbox its
//! addresses; it hands the sandbox to the node agent over the agent's unix
//! socket and returns only when the agent has decided, so the pod's
//! containers start served (or untouched) from their first instruction.
//!
//! It is small, synchronous and stateless: the agent owns every decision.
//! When the agent cannot be reached, a pod of a namespace in the mesh fails
//! (the runtime retries the sandbox: fail closed, never plaintext) and any
//! other pod passes at once. What it reads and writes is the CNI spec's:
//! `CNI_*` variables and the network configuration (with `prevResult`) on
//! standard input; the result (`prevResult`, unchanged) or an error on
//! standard output.
#![forbid(unsafe_code)]

use std::{
    io::{Read, Write},
    process::ExitCode,
};

mod agent;
mod plugin;

fn main() -> ExitCode {
    let env = plugin::Env::from_vars(std::env::vars());
    let mut config = Vec::new();
    let read = std::io::stdin().take(plugin::MAX_CONFIG as u64 + 1).read_to_end(&mut config);
    let outcome = match read {
        Ok(_) => plugin::handle(&env, &config, &mut agent::Socket),
        Err(e) => Err(plugin::Error::io(format!("reading the network configuration: {e}"))),
    };
    let (text, code) = match outcome {
        Ok(Some(out)) => (out.to_string(), ExitCode::SUCCESS),
        Ok(None) => (String::new(), ExitCode::SUCCESS),
        Err(e) => (e.to_json(&plugin::version_of(&config)).to_string(), ExitCode::FAILURE),
    };
    let mut stdout = std::io::stdout().lock();
    if !text.is_empty() && (stdout.write_all(text.as_bytes()).is_err() || stdout.flush().is_err()) {
        return ExitCode::FAILURE;
    }
    code
}
