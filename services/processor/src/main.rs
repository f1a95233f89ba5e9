//! The processor binary. Everything it does lives in the library; see `processor::Processor`
//! (the service) and `processor::replay` (`processor replay-dlq [--max N]`: send dead-lettered
//! commands through again, then exit).

common::global_allocator!();

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.split_first() {
        Some((command, rest)) if command == "replay-dlq" => processor::replay::main(rest),
        Some((other, _)) => {
            anyhow::bail!("unknown subcommand {other:?} (the only one is `replay-dlq`)")
        }
        None => common::service::main::<processor::Processor>(),
    }
}
