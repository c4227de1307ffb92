//! `skiff`: the one binary. It parses the command line (k3s's flag names and
//! defaults) and composes the crates into a server or an agent.

mod api_client;
mod cli;
mod dataplane;
mod dns;
mod images;
mod ingress;
mod join;
mod node_agent;
mod server;

use std::ffi::{c_char, c_int, c_long};

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::cli::{Cli, Command};

/// The API server's request path builds and drops many small JSON trees;
/// glibc's allocator spent about 40 % of its CPU in malloc/free under load
/// (perf, API bench), mimalloc's thread-local pages cost a fraction of that.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    // A CNI runtime runs the plugin binary with no arguments; `skiff cni` is
    // the same by name. Either way stdout carries only the CNI result, so
    // this runs before logging is set up.
    if cni::plugin::invoked_by_runtime() {
        std::process::exit(cni::plugin::main());
    }
    // The shim starts once per container and lives as long as it: it
    // skips building the whole command line and the log filter, whose
    // allocations it would otherwise carry for its whole life.
    if let Some(state_dir) = shim_state_dir() {
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .init();
        return agent::shim::main(&state_dir).context("container monitor");
    }
    let cli = Cli::parse();
    if let Command::Server(_) = &cli.command {
        purge_freed_memory_sooner();
    }
    if let Command::Cni = cli.command {
        std::process::exit(cni::plugin::main());
    }
    // rustls warns about what a TLS peer did wrong, e.g. a client that
    // names an IP address in SNI, as wrk and other OpenSSL clients do:
    // a line per handshake that any client can trigger, so only its
    // errors are shown unless RUST_LOG asks for more.
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,rustls=error")),
        )
        .init();
    // The shim forks, so it must run before any thread exists.
    if let Command::Shim(args) = &cli.command {
        return agent::shim::main(&args.state_dir).context("container monitor");
    }
    // A proxy given one CPU (`skiff ingress` pinned, as in the benchmark)
    // runs best on a single-threaded runtime.
    let one_cpu = std::thread::available_parallelism().is_ok_and(|n| n.get() == 1);
    let mut builder = if matches!(cli.command, Command::Ingress(_)) && one_cpu {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if matches!(cli.command, Command::Agent(_)) {
        join::size_runtime(&mut builder);
    }
    let runtime = builder
        .enable_all()
        .thread_name("skiff")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        match cli.command {
            Command::Server(args) => server::run(args).await,
            Command::Images(args) => images::run(args),
            // Ran above, before logging was set up.
            Command::Cni => Ok(()),
            Command::Shim(_) => Ok(()),
            Command::Dataplane(args) => dataplane::run(args).await,
            Command::Dns(args) => dns::run(args).await,
            Command::Ingress(args) => ingress::run(args).await,
            Command::Agent(args) => join::run(args).await,
        }
    })
}

/// `skiff dns` and `skiff server` run without transparent huge pages from
/// their first allocation on. mimalloc marks its arena for huge pages when
/// it reserves it, at the first allocation (before `main`); turning them
/// off later left the pages touched by then as 2 MB pages, 4 of DNS's
/// ~40 MB. For the API server, huge pages cost latency as well as memory:
/// memory that mimalloc returned came back as 2 MB pages zeroed in one
/// fault (11 % of the server's CPU during the API bench's creates). Five
/// API bench runs each way, alternated: typed create p99 5.4-12.1 ms with
/// huge pages, 4.9-6.3 ms without; RSS 128-132 MB against 117-120 MB.
/// Run from `.init_array`, before any Rust code allocates.
#[used]
#[unsafe(link_section = ".init_array")]
static NO_THP: extern "C" fn(c_int, *const *const c_char, *const *const c_char) = no_thp;

extern "C" fn no_thp(argc: c_int, argv: *const *const c_char, _: *const *const c_char) {
    if argc < 2 || argv.is_null() {
        return;
    }
    // SAFETY: glibc calls `.init_array` functions with the program's argc
    // and argv, whose first `argc` entries are C strings.
    let command = unsafe { std::ffi::CStr::from_ptr(*argv.add(1)) };
    if matches!(command.to_bytes(), b"dns" | b"server") {
        // A failure is reported again (logged) when `dns::run` or
        // `server::run` asks.
        let _ = agent::shim::disable_own_thp();
    }
}

/// `DIR` when the command line is exactly `skiff shim --state-dir DIR`, as
/// the agent starts it; anything else goes through the full parser.
fn shim_state_dir() -> Option<std::path::PathBuf> {
    let mut args = std::env::args_os().skip(1);
    let (command, flag, dir) = (args.next()?, args.next()?, args.next()?);
    (command == "shim" && flag == "--state-dir" && args.next().is_none()).then(|| dir.into())
}

/// mimalloc (v3) gives freed memory back to the system a second after the
/// free, and only while the process goes on allocating. The API server
/// frees in bursts (writes, LISTs, watch fan-out) and may then idle, so
/// it kept what the last second of a burst freed: the API bench read
/// 154-157 MB of RSS right after storing 10,000 pods, and 132-133 MB with
/// a tenth of a second, at the same CPU per call (three runs each).
fn purge_freed_memory_sooner() {
    /// `mi_option_purge_delay`'s place in `mi_option_t`, the same in the
    /// v2 and v3 mimalloc that libmimalloc-sys bundles (it binds no name
    /// for it).
    const PURGE_DELAY: c_int = 15;
    const MILLIS: c_long = 100;
    // SAFETY: mimalloc allows setting an option at any time; this one
    // only decides when later frees are returned to the system.
    unsafe { mi_option_set(PURGE_DELAY, MILLIS) }
}

unsafe extern "C" {
    fn mi_option_set(option: c_int, value: c_long);
}
