//! `store::MIGRATOR` embeds `migrations/` at compile time (`sqlx::migrate!`); a migration added
//! since the last build must rebuild the crate.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
