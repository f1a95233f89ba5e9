//! The api-gateway binary. Everything it does lives in the library; see `api_gateway::ApiGateway`.

/// mimalloc: every proxied request allocates and frees header maps, URIs and buffers across
/// worker threads; glibc's malloc and free were about a tenth of the gateway's CPU in
/// `perf` profiles of `just bench-gateway`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    common::service::main::<api_gateway::ApiGateway>()
}
