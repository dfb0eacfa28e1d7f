//! End-to-end test of `citadel-systemd top` (issue 14, item 5) under a real
//! systemd (PID 1 in a booted sandbox) with the simulator stack: the live
//! view in a real terminal (tmux: `send-keys`, `capture-pane`), quitting with
//! `q` and Ctrl-C restores the terminal, the plain mode through a pipe, and
//! `--once`, as root and as a user who cannot read the API keys.
//!
//! The gateway listens on 0.0.0.0 here, so its `/metrics` needs a key
//! (issue 12, item 5): `top` as root reads the first one from the key file.

mod stack;

use std::time::Duration;

use stack::{text, Stack, MODELS};

/// The demo stack, instant-loading, the gateway beyond loopback, a rate
/// limit the test's traffic stays under.
fn config() -> String {
    citadel_config::SIM_EXAMPLE_CONFIG
        .replace("\"--load-time\", \"2s\"", "\"--load-time\", \"0s\"")
        .replace("listen = \"127.0.0.1\"", "listen = \"0.0.0.0\"")
        // Enough for the test's traffic.
        .replace(
            "rate_limit_per_minute = 6000",
            "rate_limit_per_minute = 100000",
        )
        .replace("rate_limit_burst = 200", "rate_limit_burst = 10000")
}

/// The columns of `model`'s row on a screen or in plain output.
fn row<'a>(screen: &'a str, model: &str) -> Option<Vec<&'a str>> {
    screen
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cols| cols.first() == Some(&model))
}

/// Every model shown serving, with requests/s and tokens/s above zero and a
/// time to first token.
fn all_serving_with_traffic(screen: &str) -> bool {
    let positive = |v: &str| v.parse::<f64>().is_ok_and(|r| r > 0.0);
    MODELS.iter().all(|m| {
        row(screen, m).is_some_and(|c| {
            c.len() >= 6
                && matches!(c[1], "serving" | "active")
                && positive(c[2])
                && positive(c[3])
                && c[4] != "-"
                && c[5] != "-"
        })
    })
}

/// One chat completion and one streamed completion (streams give the time
/// to first token) for every model.
fn traffic(st: &Stack) {
    for m in MODELS {
        st.chat(m);
        let body = format!(
            r#"{{"model":"{m}","messages":[{{"role":"user","content":"hi"}}],"max_tokens":3,"stream":true}}"#
        );
        st.http(
            "POST",
            "http://127.0.0.1:8000/v1/chat/completions",
            Some(&st.api_key()),
            Some(&body),
        );
    }
}

impl Tmux<'_> {
    fn capture(&self) -> String {
        let out = self
            .st
            .sb
            .exec(&["tmux", "capture-pane", "-p", "-t", self.session])
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn alive(&self) -> bool {
        self.st
            .sb
            .exec(&["tmux", "has-session", "-t", self.session])
            .unwrap()
            .status
            .success()
    }

    fn file(&self, what: &str) -> String {
        let path = format!("/run/top-{}.{what}", self.session);
        self.st.sb.exec_ok(&["cat", &path]).unwrap_or_default()
    }
}

struct Tmux<'a> {
    st: &'a Stack,
    session: &'a str,
}

/// Runs `top` in a 160x40 tmux session; after it ends, the same pane records
/// its exit status, the terminal's modes (`stty -a`) and whether the pane is
/// still on the alternate screen and the cursor is visible, then the session
/// ends. Sends traffic until every model shows as serving with requests/s
/// above zero, then types `keys` and checks that `top` ended and left the
/// terminal as it found it.
fn top_in_tmux(st: &Stack, session: &str, keys: &str) {
    let has_tmux = st.sb.exec(&["sh", "-c", "command -v tmux"]).unwrap();
    assert!(
        has_tmux.status.success(),
        "tmux is not installed: run scripts/setup-dev.sh (it installs tmux)"
    );
    let cli = format!("{}/citadel-systemd", st.bin_dir);
    let script = format!(
        "{cli} top 2> /run/top-{session}.err; echo $? > /run/top-{session}.rc; stty -a > /run/top-{session}.stty; \
         tmux display -p '#{{alternate_on}} #{{cursor_flag}}' > /run/top-{session}.screen"
    );
    st.sb
        .exec_ok(&[
            "tmux",
            "new-session",
            "-d",
            "-s",
            session,
            "-x",
            "160",
            "-y",
            "40",
            // bash, not sh: it goes on after a child that handled Ctrl-C.
            "bash",
            "-c",
            &script,
        ])
        .expect("start tmux");
    let tmux = Tmux { st, session };
    let mut screen = String::new();
    st.sb
        .wait_until(
            &format!(
                "{session}: top shows every model serving, with requests/s, tokens/s and TTFT"
            ),
            Duration::from_secs(30),
            || {
                traffic(st);
                screen = tmux.capture();
                all_serving_with_traffic(&screen)
            },
        )
        .unwrap_or_else(|e| {
            panic!(
                "{e}\n--- screen\n{screen}\n--- exit status {} stderr\n{}\n{}",
                tmux.file("rc"),
                tmux.file("err"),
                st.journal_tail()
            )
        });
    println!("--- {session} screen\n{screen}");
    assert!(screen.contains("MEMORY / MAX"), "{screen}");
    assert!(screen.contains("q: quit"), "{screen}");
    for m in MODELS {
        let c = row(&screen, m).unwrap();
        // memory / max from systemd (the sim config caps some models at 256M).
        let memory = screen
            .lines()
            .find(|l| l.split_whitespace().next() == Some(m))
            .unwrap();
        assert!(memory.contains(" / "), "{m}: no memory column: {memory}");
        assert_eq!(c.last(), Some(&"0"), "{m}: restarts: {memory}");
        // The gateway answers from /metrics (a key was needed and found).
        assert_ne!(c[6], "-", "{m}: no in-flight figure: {memory}");
    }
    assert!(!screen.contains("gateway metrics:"), "{screen}");
    assert!(!screen.contains("note:"), "{screen}");

    st.sb
        .exec_ok(&["tmux", "send-keys", "-t", session, keys])
        .unwrap();
    st.wait(
        &format!("{session}: top ends after {keys}"),
        Duration::from_secs(10),
        || !tmux.alive(),
    );
    assert_eq!(tmux.file("rc").trim(), "0", "{session}: exit status");
    let stty = tmux.file("stty");
    let modes: Vec<&str> = stty.split_whitespace().collect();
    for mode in ["icanon", "echo", "isig"] {
        assert!(
            modes.contains(&mode),
            "{session}: {mode} not restored: {stty}"
        );
    }
    // Off the alternate screen, cursor visible again.
    assert_eq!(tmux.file("screen").trim(), "0 1", "{session}");
}

#[test]
fn issue14_top_in_tmux() {
    let st = Stack::boot("e2e-top", &config());
    st.install();
    st.cli_ok(&["start"]);
    st.wait(
        "the gateway routes to every model",
        Duration::from_secs(30),
        || {
            // Beyond loopback /health/models needs a key too.
            let (code, body) = st.http(
                "GET",
                "http://127.0.0.1:8000/health/models",
                Some(&st.api_key()),
                None,
            );
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            code == 200
                && MODELS.iter().all(|m| {
                    v["models"]
                        .as_array()
                        .and_then(|ms| ms.iter().find(|x| x["name"] == *m))
                        .is_some_and(|x| x["state"] == "ready")
                })
        },
    );
    // Beyond loopback /metrics needs a key: `top` must have sent one.
    let (code, _) = st.http("GET", "http://127.0.0.1:8000/metrics", None, None);
    assert_eq!(code, 401, "the gateway's /metrics should need a key here");
    // `health` sends a key for /health/models too (issue 12, item 5), so it
    // sees the gateway's view of every model: healthy, not "unknown".
    let health = st.cli_ok(&["health", "--json"]);
    let h: serde_json::Value = serde_json::from_str(&health).expect("health --json");
    assert_eq!(h["overall"], "healthy", "{health}");
    assert!(
        !health.contains("\"unknown\""),
        "health reads the gateway's view beyond loopback: {health}"
    );

    top_in_tmux(&st, "top-q", "q");
    top_in_tmux(&st, "top-ctrl-c", "C-c");

    // Not a terminal: a header, then plain lines per model every interval,
    // no escape codes; `head` closing the pipe is a normal end (exit 0).
    let cli = format!("{}/citadel-systemd", st.bin_dir);
    traffic(&st);
    let lines = 1 + 2 * MODELS.len();
    let out = st
        .sb
        .exec(&[
            "bash",
            "-o",
            "pipefail",
            "-c",
            &format!("{cli} top --interval 1s | head -n {lines}"),
        ])
        .unwrap();
    let plain = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "top | head: {}", text(&out));
    assert!(
        !plain.contains('\x1b'),
        "escape codes in plain mode: {plain:?}"
    );
    assert_eq!(plain.lines().count(), lines, "{plain}");
    assert!(plain.starts_with("TIME "), "{plain}");
    for m in MODELS {
        let shown = plain
            .lines()
            .filter(|l| l.split_whitespace().nth(1) == Some(m))
            .count();
        assert_eq!(shown, 2, "{m} in {plain}");
    }

    // --once: one plain table with a rate measured over one interval.
    let once = st.cli_ok(&["top", "--once", "--interval", "500ms"]);
    assert!(!once.contains('\x1b'), "{once:?}");
    for m in MODELS {
        let c = row(&once, m).unwrap_or_else(|| panic!("{m} missing: {once}"));
        assert!(matches!(c[1], "serving" | "active"), "{once}");
    }

    // A user who cannot read the API keys still sees systemd's view, and
    // a note on why the gateway's figures are missing.
    let once = st
        .sb
        .exec(&["runuser", "-u", "nobody", "--", &cli, "top", "--once"])
        .unwrap();
    let shown = String::from_utf8_lossy(&once.stdout).into_owned();
    assert!(once.status.success(), "{}", text(&once));
    assert!(shown.contains("run as root"), "{shown}");
    for m in MODELS {
        let c = row(&shown, m).unwrap_or_else(|| panic!("{m} missing: {shown}"));
        assert_eq!(c[1], "active", "{shown}");
        assert_eq!(c[2], "-", "{shown}");
    }

    // `health` as that user: the gateway's per-model view needs a key it
    // cannot read, so systemd's READY decides: healthy, not "loading" forever.
    let health = st
        .sb
        .exec(&["runuser", "-u", "nobody", "--", &cli, "health", "--json"])
        .unwrap();
    let shown = String::from_utf8_lossy(&health.stdout).into_owned();
    assert!(health.status.success(), "{}", text(&health));
    let h: serde_json::Value = serde_json::from_str(&shown).expect("health --json");
    assert_eq!(h["overall"], "healthy", "{shown}");
    assert!(shown.contains("run as root"), "{shown}");
}
