//! The `mixd` command line: `mixd serve` (the default) and `mixd mix` (offline).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use mixd::access::{Keys, Scope};
use mixd::audio::{self, BitDepth, Format, FormatSettings, MixObserver, MixSettings, Outputs, Stage, StemSource};
use mixd::config::{parse_duration, Config, TokenKeys};
use mixd::ids::ProjectId;
use mixd::startup::Application;

#[derive(Parser)]
#[command(name = "mixd", version, about = "Mixes and masters audio stems, with live job progress", args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// With no subcommand, mixd serves with these flags.
    #[command(flatten)]
    serve: Config,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API, live events and the dashboard (the default).
    Serve(Box<Config>),
    /// Mix stems into a mastered WAV, offline, with a progress bar.
    Mix(MixArgs),
    /// Print a scoped token signed with the configured token key (for scripts, and to try it out).
    Token(TokenArgs),
}

#[derive(Args)]
struct TokenArgs {
    /// The project the token is for.
    #[arg(long)]
    project: ProjectId,
    #[arg(long, value_enum, default_value_t = Scope::Read)]
    scope: Scope,
    /// How long it lives (e.g. 90s, 15m, 24h; at most 24h).
    #[arg(long, default_value = "15m", value_parser = parse_duration)]
    ttl: std::time::Duration,
    /// Who it is for (the `sub` claim).
    #[arg(long)]
    subject: Option<String>,
    #[command(flatten)]
    keys: TokenKeys,
}

#[derive(Args)]
struct MixArgs {
    /// Stem files (WAV, FLAC, MP3, OGG, AAC/M4A, ALAC, AIFF).
    #[arg(required = true)]
    stems: Vec<PathBuf>,
    /// Where to write the mix: its extension (.wav, .flac, .mp3, .opus) picks the format.
    #[arg(short, long)]
    output: PathBuf,
    /// Several formats at once (wav, flac, mp3, opus; comma-separated or repeated): each is written
    /// beside --output, with its own extension. Bitrates come from --settings' output.formats.
    #[arg(long, value_delimiter = ',', value_parser = parse_format)]
    format: Vec<Format>,
    /// Mix settings as JSON (the contract's MixSettings); the flags below override its master/output.
    #[arg(long)]
    settings: Option<PathBuf>,
    #[arg(long, allow_negative_numbers = true)]
    target_lufs: Option<f64>,
    #[arg(long, allow_negative_numbers = true)]
    true_peak: Option<f64>,
    /// 16 (dithered), 24 or 32 (float).
    #[arg(long)]
    bit_depth: Option<u16>,
    /// Output sample rate; default: the highest stem rate.
    #[arg(long)]
    rate: Option<u32>,
    /// A track whose loudness, tonal balance and stereo width the master matches (it is not
    /// mixed): the contract's master.reference.
    #[arg(long)]
    reference: Option<PathBuf>,
    /// Balances the stems by loudness first: the contract's auto.balance.
    #[arg(long)]
    balance: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Mix(args)) => run_mix(args),
        Some(Command::Token(args)) => print_token(args),
        Some(Command::Serve(config)) => serve(*config),
        None => serve(cli.serve),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config: Config) -> Result<(), String> {
    mixd::telemetry::init(config.log_format);
    let runtime = tokio::runtime::Runtime::new().map_err(|err| format!("starting the runtime: {err}"))?;
    let grace = config.shutdown_grace;
    let served = runtime.block_on(async {
        let app = Application::build(config).await.map_err(|err| format!("{err:#}"))?;
        let shutdown = app.shutdown_token();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutting down");
            shutdown.cancel();
        });
        app.run_until_stopped().await.map_err(|err| format!("server error: {err}"))
    });
    // Work still on the blocking pool (a stem probe, an output sweep) would hold a plain drop of
    // the runtime until it ends. Mixes run on the engine's own threads, which nothing waits
    // for: an unfinished job is re-queued at the next start.
    runtime.shutdown_timeout(grace);
    served
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn print_token(args: TokenArgs) -> Result<(), String> {
    let keys = Keys::new(&[], &args.keys.token_keys);
    let (token, _) = keys.mint(&args.project, args.scope, args.ttl, args.subject).map_err(|err| err.to_string())?;
    println!("{token}");
    Ok(())
}

fn run_mix(args: MixArgs) -> Result<(), String> {
    // The engine's debug lines (each lossy encode's measured peak and loudness) under RUST_LOG.
    mixd::telemetry::init(mixd::config::LogFormat::Text);
    let mut settings = match &args.settings {
        Some(path) => {
            let bytes = std::fs::read(path).map_err(|err| format!("{}: {err}", path.display()))?;
            MixSettings::from_json(&bytes).map_err(|err| format!("{}: {err}", path.display()))?
        }
        None => MixSettings::default(),
    };
    if let Some(target) = args.target_lufs {
        settings.master.target_lufs = Some(target);
    }
    if let Some(ceiling) = args.true_peak {
        settings.master.true_peak_dbtp = ceiling;
    }
    if let Some(bits) = args.bit_depth {
        settings.output.bit_depth = BitDepth::try_from(bits).map_err(|err| format!("--bit-depth: {err}"))?;
    }
    if args.rate.is_some() {
        settings.output.sample_rate = args.rate;
    }
    if args.balance {
        settings.auto.balance = true;
    }
    let source = |path: &PathBuf| {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        StemSource { id: name.clone(), name, path: path.clone() }
    };
    let mut stems: Vec<StemSource> = args.stems.iter().map(source).collect();
    if let Some(path) = &args.reference {
        // By its path: a reference may share a stem's file name.
        let reference = StemSource { id: path.display().to_string(), ..source(path) };
        settings.master.reference = Some(reference.id.clone());
        stems.push(reference);
    }
    settings.output.formats = formats(&args, &settings.output.formats)?;
    let settings = audio::plan(&stems, settings).map_err(|err| err.to_string())?;
    // Each file is written under a hidden sibling name and renamed over its path once whole. The
    // WAV the others are made from, when not asked for, stays hidden and is removed at the end.
    let file_name = args.output.file_stem().ok_or_else(|| format!("{}: --output must name a file", args.output.display()))?.to_string_lossy().into_owned();
    let asked = &settings.settings().output.formats;
    let wav_asked = asked.iter().any(|format| format.format == Format::Wav);
    let outputs = Outputs::new(asked, |format| {
        let extension = format.extension();
        if format == Format::Wav && !wav_asked {
            (args.output.with_file_name(format!(".{file_name}.master.wav.partial")), args.output.with_file_name(format!(".{file_name}.master.wav.writing.partial")))
        } else {
            (args.output.with_extension(extension), args.output.with_file_name(format!(".{file_name}.{extension}.partial")))
        }
    });

    let bar = ProgressBar::new(100);
    bar.set_style(ProgressStyle::with_template("{spinner} {msg:18} [{bar:40}] {pos:>3}% {elapsed}").expect("valid template").progress_chars("=> "));
    let observer = BarObserver { bar, position: Mutex::new(0) };
    // On a pool's thread, as the server runs a mix: the stages it runs side by side are then
    // that pool's own work, where from this thread each step was handed to the pool and waited
    // for, and a worker that had gone to sleep woken for it.
    let pool = rayon::ThreadPoolBuilder::new().thread_name(|i| format!("mixd-mix-{i}")).build().map_err(|err| err.to_string())?;
    let mixed = pool.install(|| audio::mix(&stems, &settings, &outputs, &observer));
    if !wav_asked {
        let _ = std::fs::remove_file(&outputs.master);
    }
    let (report, delivered) = mixed.map_err(|err| err.to_string())?;
    observer.bar.finish_with_message("Complete");

    let value = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
    for (file, delivered) in outputs.files.iter().zip(&delivered) {
        let bitrate = delivered.bitrate_kbps.map_or(String::new(), |kbps| format!(", {kbps} kbps"));
        println!("{} ({}{bitrate})", file.path.display(), delivered.format.extension());
        println!(
            "  decoded         {:.3} s, {} LUFS, {} dBTP, {} bytes",
            delivered.duration_s,
            value(delivered.integrated_lufs),
            value(delivered.true_peak_dbtp),
            delivered.bytes
        );
    }
    println!("master");
    println!("  duration        {:.3} s", report.duration_s);
    println!("  format          {} Hz, {}-bit, {} channels", report.sample_rate, report.bit_depth, report.channels);
    println!("  integrated      {} LUFS", value(report.loudness.integrated_lufs));
    println!("  true peak       {} dBTP", value(report.loudness.true_peak_dbtp));
    println!("  loudness range  {} LU", value(report.loudness.loudness_range_lu));
    for stem in &report.stems {
        let state = if stem.audible { "" } else { " (muted)" };
        let balance = match (stem.auto_gain_db, stem.loudness_lufs) {
            (Some(gain), loudness) => format!(", {} LUFS, auto gain {gain:+.2} dB", value(loudness)),
            (None, _) => String::new(),
        };
        println!("  stem {:24} offset {:+.2} ms{balance}{state}", stem.name, stem.offset_ms);
    }
    if let Some(reference) = &report.reference {
        println!("reference {} ({:.2} LUFS)", reference.name, reference.integrated_lufs);
        println!("  spectral error  {} dB before, {} dB after", value(reference.spectral_error_db_before), value(reference.spectral_error_db_after));
        println!(
            "  width           {} before, {} after, the reference {}",
            value(reference.width_ratio_before),
            value(reference.width_ratio_after),
            value(reference.width_ratio_reference)
        );
    }
    Ok(())
}

/// The formats to write: `--format`'s, else the one `--output`'s extension names. A format the
/// settings file lists keeps its bitrate.
fn formats(args: &MixArgs, from_settings: &[FormatSettings]) -> Result<Vec<FormatSettings>, String> {
    let named = if args.format.is_empty() {
        let extension = args.output.extension().map(|e| e.to_string_lossy().into_owned()).unwrap_or_default();
        let format = Format::from_extension(&extension)
            .ok_or_else(|| format!("{}: the extension names no format (wav, flac, mp3, opus); give --format", args.output.display()))?;
        vec![format]
    } else {
        args.format.clone()
    };
    Ok(named.into_iter().map(|format| from_settings.iter().find(|asked| asked.format == format).copied().unwrap_or(FormatSettings::new(format))).collect())
}

fn parse_format(name: &str) -> Result<Format, String> {
    Format::from_extension(name).ok_or_else(|| format!("{name} is not one of wav, flac, mp3, opus"))
}

struct BarObserver {
    bar: ProgressBar,
    position: Mutex<u64>,
}

impl MixObserver for BarObserver {
    fn progress(&self, stage: Stage, fraction: f64) {
        let percent = stage.percent(fraction) as u64;
        let mut position = self.position.lock().expect("never poisoned");
        if percent > *position {
            *position = percent;
            self.bar.set_position(percent);
        }
        self.bar.set_message(stage.label());
    }

    fn is_cancelled(&self) -> bool {
        false
    }
}
