//! Prints the `MiddlewareStack` CRD as YAML on stdout (`just crds` writes it to
//! `crds/middlewarestack.yaml`).
use std::io::Write as _;
use std::process::ExitCode;

fn main() -> ExitCode {
    let yaml = match operator::crd_yaml() {
        Ok(yaml) => yaml,
        Err(error) => {
            eprintln!("failed to serialize the CRD: {error}");
            return ExitCode::FAILURE;
        }
    };
    match std::io::stdout().lock().write_all(yaml.as_bytes()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("failed to write the CRD: {error}");
            ExitCode::FAILURE
        }
    }
}
