//! The command-service binary. Everything it does lives in the library; see `command_service::CommandService`.

common::global_allocator!();

fn main() -> anyhow::Result<()> {
    common::service::main::<command_service::CommandService>()
}
