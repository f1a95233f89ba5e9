//! The ws-hub binary. Everything it does lives in the library; see `ws_hub::WsHub`.

common::global_allocator!();

fn main() -> anyhow::Result<()> {
    common::service::main::<ws_hub::WsHub>()
}
