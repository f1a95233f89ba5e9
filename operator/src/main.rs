//! `meridian-operator`: reconciles `MiddlewareStack` resources (see the crate docs).
fn main() -> anyhow::Result<()> {
    common::service::main::<operator::config::Operator>()
}
