//! The processor binary. Everything it does lives in the library; see `processor::Processor`.

common::global_allocator!();

fn main() -> anyhow::Result<()> {
    common::service::main::<processor::Processor>()
}
