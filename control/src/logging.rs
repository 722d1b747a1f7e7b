//! The node's log: `tracing` events, by level, on stderr, one line each. The level comes
//! from `--log-level` (or the config file's `log-level`), else `RUST_LOG`, else `info`;
//! SIGHUP rereads the config file's. Under systemd (`JOURNAL_STREAM` set) each line starts
//! with its syslog priority (`<3>` error, `<4>` warn, `<6>` info, `<7>` debug and trace),
//! which the journal keeps as the entry's priority, and carries no timestamp (the journal
//! stamps its entries itself).

use std::path::Path;

use anyhow::{anyhow, bail, Result};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::{format, FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// The level where neither `--log-level` nor `RUST_LOG` says.
pub const DEFAULT_LEVEL: &str = "info";
const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// The installed log, whose level can change while the node runs.
pub struct Log {
    handle: reload::Handle<EnvFilter, Registry>,
}

/// The filter for `level`: a level name, or directives in `RUST_LOG`'s syntax; `None`:
/// `RUST_LOG`, else [`DEFAULT_LEVEL`].
fn filter(level: Option<&str>) -> Result<EnvFilter> {
    let Some(level) = level else {
        return Ok(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LEVEL)));
    };
    // A bare word would be taken for a target name: only the levels are bare words.
    if !level.contains(['=', ',']) && !LEVELS.contains(&level) {
        bail!(
            "log level {level:?}: one of {} (or directives such as info,nvmirror_dataplane=debug)",
            LEVELS.join(", ")
        );
    }
    EnvFilter::try_new(level).map_err(|e| anyhow!("log level {level:?}: {e}"))
}

/// Installs the log for this process.
pub fn init(level: Option<&str>) -> Result<Log> {
    let (layer, handle) = reload::Layer::new(filter(level)?);
    let registry = tracing_subscriber::registry().with(layer);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(false).with_ansi(false);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        registry.with(fmt.event_format(Journal)).try_init()
    } else {
        registry.with(fmt).try_init()
    }
    .map_err(|e| anyhow!("install the log: {e}"))?;
    Ok(Log { handle })
}

impl Log {
    /// On SIGHUP: the `log-level` of the config file `config` where it has one, else
    /// `started` (the level the node started with). A bad file or level is logged and
    /// changes nothing.
    pub fn reload_from(&self, config: Option<&Path>, started: Option<&str>) {
        let level = match config.map(|p| crate::config::setting(p, "log-level")) {
            Some(Ok(Some(l))) => Some(l),
            Some(Ok(None)) | None => started.map(str::to_string),
            Some(Err(e)) => return tracing::warn!("SIGHUP: {e:#}; the log level stays"),
        };
        match filter(level.as_deref()).and_then(|f| self.handle.reload(f).map_err(|e| anyhow!("{e}"))) {
            Ok(()) => tracing::info!("SIGHUP: log level {}", level.as_deref().unwrap_or("from RUST_LOG")),
            Err(e) => tracing::warn!("SIGHUP: {e:#}; the log level stays"),
        }
    }
}

/// A line for the journal: `<PRIORITY>message fields`.
struct Journal;

impl<S, N> FormatEvent<S, N> for Journal
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: format::Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let priority = match *event.metadata().level() {
            Level::ERROR => 3,
            Level::WARN => 4,
            Level::INFO => 6,
            _ => 7,
        };
        write!(w, "<{priority}>")?;
        ctx.field_format().format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_directives_are_taken_and_other_words_refused() {
        for ok in ["warn", "info", "off", "info,nvmirror_dataplane=debug", "nvmirror_control=trace"] {
            filter(Some(ok)).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in ["loud", "warning", ""] {
            let e = filter(Some(bad)).expect_err(bad).to_string();
            assert!(e.contains("one of off, error, warn"), "{bad}: {e}");
        }
    }
}
