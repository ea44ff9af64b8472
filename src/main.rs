//! `llmproxy --config config.yaml [--check] | --version`

use llmproxy::config::Config;

const USAGE: &str = "usage: llmproxy [--config FILE] [--check] [--version]
       llmproxy spool replay-dead [--config FILE]

  --config FILE   configuration file (default: ./config.yaml)
  --check         validate the configuration, print a summary, exit
  --version       print the version and exit
  spool replay-dead   POST the dead-lettered records again (after the receiver is fixed);
                      those it takes are removed from dead-letter.jsonl";

fn main() {
    let mut config_path = "config.yaml".to_string();
    let mut check = false;
    let mut replay_dead = false;
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().is_some_and(|a| a == "spool") {
        args.next();
        match args.next().as_deref() {
            Some("replay-dead") => replay_dead = true,
            _ => fail_usage("spool: expected `replay-dead`"),
        }
    }
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" | "-c" => match args.next() {
                Some(p) => config_path = p,
                None => fail_usage("--config needs a file"),
            },
            s if s.starts_with("--config=") => config_path = s["--config=".len()..].to_string(),
            "--check" => check = true,
            "--version" | "-V" => {
                println!("llmproxy {}", env!("CARGO_PKG_VERSION"));
                return;
            }
            "--help" | "-h" => {
                println!("{USAGE}");
                return;
            }
            other => fail_usage(&format!("unknown argument {other:?}")),
        }
    }
    let config = match Config::load(&config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("llmproxy: invalid config: {e}");
            std::process::exit(2);
        }
    };
    llmproxy::log::init(config.log_level);
    if check {
        print!("config {config_path} is valid\n{}", config.summary());
        return;
    }
    if replay_dead {
        match llmproxy::delivery::replay_dead(&config.usage_hook) {
            Ok((delivered, kept)) => {
                println!(
                    "replayed {delivered} dead-lettered records; {kept} kept in dead-letter.jsonl"
                );
                std::process::exit(if kept == 0 { 0 } else { 1 });
            }
            Err(e) => {
                eprintln!("llmproxy: {e}");
                std::process::exit(1);
            }
        }
    }
    if let Err(e) = llmproxy::server::run(config, &config_path) {
        log::error!("{e}");
        std::process::exit(1);
    }
}

fn fail_usage(msg: &str) -> ! {
    eprintln!("llmproxy: {msg}\n{USAGE}");
    std::process::exit(2);
}
