//! The official `openai` Python client against the gateway and simulators.
//! Needs the venv from `scripts/setup-test-python.sh` (interpreter from
//! `$CITADEL_TEST_PYTHON`, default /var/cache/citadel-dev/pyclient/bin/python);
//! fails (never skips) when it is missing.

mod common;

use std::process::Command;
use std::time::Duration;

use citadel_engine_sim::SimConfig;
use common::*;

const DEFAULT_PYTHON: &str = "/var/cache/citadel-dev/pyclient/bin/python";
const HOWTO: &str = "run `scripts/setup-test-python.sh` (creates /var/cache/citadel-dev/pyclient with the pinned `openai` package; needs python3-venv and PyPI) or set CITADEL_TEST_PYTHON to a Python that has `openai` installed";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_openai_python_client() {
    let python = std::env::var("CITADEL_TEST_PYTHON").unwrap_or_else(|_| DEFAULT_PYTHON.into());
    let probe = Command::new(&python)
        .args(["-c", "import openai; print(openai.__version__)"])
        .output();
    match probe {
        Err(e) => panic!("cannot run the test Python `{python}` ({e}); {HOWTO}"),
        Ok(o) if !o.status.success() => panic!(
            "`{python}` cannot import `openai`: {}; {HOWTO}",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Ok(_) => {}
    }

    let a = sim("alpha").await;
    let loading = sim_with(SimConfig {
        models: vec!["slow".into()],
        load_time: Duration::from_secs(600),
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let keys = write_keys(
        dir.path(),
        &[
            "sk-test-0123456789abcdef0123456789abcdef",
            "sk-burst-0123456789abcdef0123456789abcdef",
        ],
    );
    let mut ma = m("alpha", a.addr.port());
    ma.aliases = vec!["gpt-4o-mini"];
    let s = settings(
        &[ma, m("slow", loading.addr.port())],
        "auth = true\nrate_limit_per_minute = 30\nmax_body = \"64K\"",
    );
    let gw = gateway(&s, Some(keys)).await;
    let c = client();
    wait_model_state(&c, gw.addr(), "alpha", "ready").await;
    wait_model_state(&c, gw.addr(), "slow", "loading").await;

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_client.py");
    let out = tokio::process::Command::new(&python)
        .arg(script)
        .env("GATEWAY_URL", format!("http://{}", gw.addr()))
        .env("API_KEY", "sk-test-0123456789abcdef0123456789abcdef")
        .env("BURST_KEY", "sk-burst-0123456789abcdef0123456789abcdef")
        .env("MODEL", "alpha")
        .env("ALIAS", "gpt-4o-mini")
        .env("LOADING_MODEL", "slow")
        .output()
        .await
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success() && stdout.contains("ALL OK"),
        "openai client script failed:\n{stdout}\n{stderr}"
    );
    gw.shutdown(Duration::from_secs(10)).await;
}
