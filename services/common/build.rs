//! `sqlx::migrate!` embeds `migrations/` at compile time, but Cargo does not know that: without
//! this, adding a migration file would not rebuild the crate and binaries would ship without it.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
