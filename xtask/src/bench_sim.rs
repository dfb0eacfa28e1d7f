//! Not implemented yet.

pub fn run(_args: Vec<String>) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
