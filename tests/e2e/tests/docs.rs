//! The documentation's examples are tests: the walkthrough runs and shows
//! what the README says it shows, the README quotes it verbatim, and every
//! ```psql block in docs/*.md runs, failing exactly where it says `-- ERROR:`.

use std::path::{Path, PathBuf};
use std::io::Write;
use std::process::{Command, Stdio};

use levqor_e2e::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn psql_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```psql") => current = Some(String::new()),
            (Some(_), "```") => blocks.push(current.take().unwrap()),
            (Some(b), l) => {
                b.push_str(l);
                b.push('\n');
            }
            _ => {}
        }
    }
    assert!(current.is_none(), "unterminated ```psql block");
    blocks
}

/// Run a psql script as the superuser in a fresh database; returns stdout and stderr.
fn run_psql(db: &str, script: &str, stop_on_error: bool) -> (String, String) {
    let mut su = connect_to(port(), "postgres", "postgres");
    su.batch_execute(&format!("DROP DATABASE IF EXISTS {db}")).unwrap();
    su.batch_execute(&format!("CREATE DATABASE {db}")).unwrap();
    let mut child = Command::new("/usr/lib/postgresql/15/bin/psql")
        .args(["-X", "-h", "127.0.0.1", "-p", &port().to_string(), "-U", "postgres", "-d", db])
        .args(["-v", &format!("ON_ERROR_STOP={}", u8::from(stop_on_error)), "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run psql");
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn the_walkthrough_shows_what_the_readme_says() {
    let _ = db(); // make sure the cluster-wide levqor roles exist
    let walkthrough = std::fs::read_to_string(repo().join("demo/walkthrough.sql")).unwrap();
    // A previous run's role would make CREATE ROLE fail.
    let mut su = connect_to(port(), "postgres", "postgres");
    su.batch_execute("DROP DATABASE IF EXISTS docs_walkthrough").unwrap();
    su.batch_execute("DROP ROLE IF EXISTS demo_app").unwrap();
    let (out, err) = run_psql("docs_walkthrough", &walkthrough, true);

    let section = |from: &str, to: &str| -> String {
        let start = out.find(from).unwrap_or_else(|| panic!("{from} missing:\n{out}\n{err}"));
        let end = out[start..].find(to).map(|e| start + e).unwrap_or(out.len());
        out[start..end].to_string()
    };
    let acme = section(" acme \n", " globex \n");
    assert!(acme.contains("giant magnet") && acme.contains("rocket skates"), "{acme}");
    assert!(!acme.contains("doomsday"), "{acme}");
    let globex = section(" globex \n", "== 6.");
    assert!(globex.contains("doomsday device") && !globex.contains("rocket"), "{globex}");
    assert!(section("rows_without_context", "== 7.").contains("\n                    0\n"));
    for expected in [
        "ERROR:  permission denied to set parameter \"levqor.context\"",
        "ERROR:  invalid levqor API key",
        "ERROR:  new row violates row-level security policy for table \"projects\"",
        "ERROR:  TRUNCATE of public.projects is refused",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
    assert_eq!(err.matches("ERROR:").count(), 5, "{err}");
    let superuser_view = section("== 8.", "\u{0}");
    assert_eq!(superuser_view.matches(" acme ").count(), 2);
    assert_eq!(superuser_view.matches(" globex ").count(), 1);

    // The README quotes the walkthrough line for line, in order.
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let mut lines = walkthrough.lines();
    for block in psql_blocks(&readme) {
        for quoted in block.lines().filter(|l| !l.trim().is_empty()) {
            assert!(
                lines.any(|l| l == quoted),
                "README line not in demo/walkthrough.sql (or out of order): {quoted:?}"
            );
        }
    }
}

#[test]
fn every_psql_example_in_docs_runs_as_documented() {
    let _ = db();
    let mut su = connect_to(port(), "postgres", "postgres");
    su.batch_execute(
        "DO $$ BEGIN
           IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'app_user') THEN
             CREATE ROLE app_user LOGIN IN ROLE levqor_app; END IF;
           IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'app_server') THEN
             CREATE ROLE app_server LOGIN IN ROLE levqor_app, levqor_context_admin; END IF;
           IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'ops') THEN
             CREATE ROLE ops LOGIN IN ROLE levqor_admin; END IF;
         END $$;",
    )
    .unwrap();
    let mut checked = 0;
    let mut docs: Vec<_> = std::fs::read_dir(repo().join("docs")).unwrap().map(|e| e.unwrap().path()).collect();
    docs.sort();
    for path in docs {
        let text = std::fs::read_to_string(&path).unwrap();
        let blocks = psql_blocks(&text);
        if blocks.is_empty() {
            continue;
        }
        let stem = path.file_stem().unwrap().to_string_lossy().replace('-', "_");
        let script = format!("CREATE EXTENSION levqor;\n{}", blocks.concat());
        let expected: Vec<String> = script
            .lines()
            .filter_map(|l| l.split_once("-- ERROR: ").map(|(_, msg)| msg.trim().to_string()))
            .collect();
        let (out, err) = run_psql(&format!("docs_{stem}"), &script, false);
        let errors: Vec<&str> = err.lines().filter(|l| l.contains("ERROR:")).collect();
        assert_eq!(
            errors.len(),
            expected.len(),
            "{}: expected errors {expected:#?}\ngot:\n{err}\noutput:\n{out}",
            path.display()
        );
        for (got, want) in errors.iter().zip(&expected) {
            assert!(got.contains(want.as_str()), "{}: expected {want:?}, got {got:?}", path.display());
        }
        checked += 1;
    }
    assert!(checked >= 3, "the docs have psql examples");
}
