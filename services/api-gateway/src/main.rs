//! The api-gateway binary. Everything it does lives in the library; see `api_gateway::ApiGateway`.

common::global_allocator!();

fn main() -> anyhow::Result<()> {
    common::service::main::<api_gateway::ApiGateway>()
}
