//! `llmproxy --config config.yaml [--check] | --version`

use llmproxy::config::Config;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "usage: llmproxy [--config FILE] [--check] [--version]

  --config FILE   configuration file (default: ./config.yaml)
  --check         validate the configuration, print a summary, exit
  --version       print the version and exit";

fn main() {
    let mut config_path = "config.yaml".to_string();
    let mut check = false;
    let mut args = std::env::args().skip(1);
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
    if check {
        print!("config {config_path} is valid\n{}", config.summary());
        return;
    }
    if let Err(e) = llmproxy::server::run(config) {
        llmproxy::error!("{e}");
        std::process::exit(1);
    }
}

fn fail_usage(msg: &str) -> ! {
    eprintln!("llmproxy: {msg}\n{USAGE}");
    std::process::exit(2);
}
