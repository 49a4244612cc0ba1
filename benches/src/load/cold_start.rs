use super::{Opts, Report, Result};

pub async fn run(_opts: &Opts) -> Result<Report> {
    Err("not yet".into())
}
