//! Per-tenant backups, verified restores, GDPR exports and DR drills
//! (docs/backups.md).
//!
//! A backup reads one tenant in one REPEATABLE READ transaction, as a login
//! role granted `levqor_backup`, acting for that tenant
//! (`levqor.backup_context`): every row it copies came through row level
//! security, so an archive cannot hold another tenant's row. Its tables'
//! DDL comes from the real `pg_dump --schema-only`, on the same snapshot.
//! A restore writes the rows back the same way, in one transaction, so it
//! can neither read nor change another tenant's rows, and it compares what
//! it wrote with the manifest before it commits.

pub mod archive;
pub mod schedule;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::Utc;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_postgres::Client;

use crate::config::{secret, Backup as BackupConfig, Config};
use crate::db::Target;
use archive::{Manifest, TableEntry};

/// The connection backups use: `[backup] database_url`, else `[database]`.
pub fn target(cfg: &Config) -> Target {
    match cfg.backup.as_ref().and_then(|b| b.database_url.clone()) {
        Some(url) => Target { url, password_env: cfg.backup.as_ref().and_then(|b| b.password_env.clone()) },
        None => Target { url: cfg.database.url.clone(), password_env: cfg.database.password_env.clone() },
    }
}

fn backup_cfg(cfg: &Config) -> Result<&BackupConfig, String> {
    cfg.backup.as_ref().ok_or_else(|| "this needs [backup] in the configuration".to_string())
}

pub fn key(cfg: Option<&Config>) -> Result<Option<[u8; 32]>, String> {
    match cfg.and_then(|c| c.backup.as_ref()).and_then(|b| b.encryption_key_env.as_ref()) {
        None => Ok(None),
        Some(env) => {
            let s = secret("backup.encryption_key_env", env).map_err(|e| e.to_string())?;
            archive::parse_key(s.expose()).map(Some)
        }
    }
}

async fn connect(t: &Target) -> Result<Client, String> {
    crate::db::connect(t).await.map(|db| db.client).map_err(|e| format!("database: {e}"))
}

fn pg_err(e: tokio_postgres::Error) -> String {
    crate::db::describe(&e)
}

async fn copy_out(client: &Client, sql: &str) -> Result<Vec<u8>, String> {
    let stream = client.copy_out(sql).await.map_err(pg_err)?;
    futures_util::pin_mut!(stream);
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.map_err(pg_err)?);
    }
    Ok(out)
}

async fn copy_in(client: &Client, sql: &str, data: Vec<u8>) -> Result<u64, String> {
    let sink = client.copy_in(sql).await.map_err(pg_err)?;
    futures_util::pin_mut!(sink);
    for chunk in data.chunks(1 << 20) {
        sink.send(Bytes::copy_from_slice(chunk)).await.map_err(pg_err)?;
    }
    sink.finish().await.map_err(pg_err)
}

fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn column_list(cols: &[String]) -> String {
    cols.iter().map(|c| ident(c)).collect::<Vec<_>>().join(", ")
}

fn qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", ident(schema), ident(name))
}

/// Progress: a bar on a terminal, log lines otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    what: String,
}

impl Progress {
    fn new(what: &str, len: u64) -> Progress {
        let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
            let b = indicatif::ProgressBar::new(len);
            b.set_style(indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} tables").unwrap());
            b.set_message(what.to_string());
            b
        });
        Progress { bar, what: what.into() }
    }
    fn table(&self, name: &str, rows: u64) {
        match &self.bar {
            Some(b) => b.inc(1),
            None => tracing::info!(task = %self.what, table = name, rows, "table done"),
        }
    }
    fn done(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// A backup taken: where, how big, what.
pub struct Taken {
    pub path: PathBuf,
    pub bytes: u64,
    pub sha256: String,
    pub rows: u64,
    pub manifest: Manifest,
    pub elapsed: Duration,
}

/// Take one tenant's backup into `dir` (default `[backup] dir`).
pub async fn take(cfg: &Config, tenant: &str, dir: Option<&Path>) -> Result<Taken, String> {
    let started = Instant::now();
    let b = backup_cfg(cfg)?;
    let key = key(Some(cfg))?;
    let t = target(cfg);
    let client = connect(&t).await?;
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .await
        .map_err(pg_err)?;
    let tenant_id: uuid::Uuid = client.query_one("SELECT levqor.backup_context($1)", &[&tenant]).await.map_err(pg_err)?.get(0);
    let catalog: Value =
        client.query_one("SELECT levqor.backup_begin($1, $2)", &[&tenant, &b.include_secrets]).await.map_err(pg_err)?.get(0);
    let snapshot: String = client.query_one("SELECT pg_export_snapshot()", &[]).await.map_err(pg_err)?.get(0);
    let tenant_row = catalog.get("tenant").cloned().unwrap_or(Value::Null);
    let slug = tenant_row.get("slug").and_then(Value::as_str).unwrap_or(tenant).to_string();
    let schema = tenant_row.get("schema_name").and_then(Value::as_str).map(str::to_owned);
    let tables: Vec<Value> = catalog.get("tables").and_then(Value::as_array).cloned().unwrap_or_default();
    let server_version: i32 = catalog.get("server_version_num").and_then(Value::as_i64).unwrap_or(0) as i32;

    let mut w = archive::Writer::new();
    let mut entries = Vec::new();
    let mut total_rows = 0;
    let progress = Progress::new(&format!("backup {slug}"), tables.len() as u64);
    for (i, tv) in tables.iter().enumerate() {
        let schema_name = tv.get("schema").and_then(Value::as_str).unwrap_or("public").to_string();
        let name = tv.get("name").and_then(Value::as_str).unwrap_or_default().to_string();
        let columns: Vec<String> =
            tv.get("columns").and_then(Value::as_array).map(|c| c.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect()).unwrap_or_default();
        let sql = format!("COPY (SELECT {} FROM {}) TO STDOUT", column_list(&columns), qualified(&schema_name, &name));
        let data = copy_out(&client, &sql).await?;
        let (rows, sum) = archive::rows_checksum(&data);
        let file = format!("data/{i:04}-{schema_name}.{name}.copy.zst");
        w.add(&file, &archive::compress(&data));
        total_rows += rows;
        progress.table(&format!("{schema_name}.{name}"), rows);
        entries.push(TableEntry {
            table: format!("{schema_name}.{name}"),
            schema: schema_name,
            name,
            tenant_column: tv.get("tenant_column").and_then(Value::as_str).map(str::to_owned),
            scope_column: tv.get("scope_column").and_then(Value::as_str).map(str::to_owned),
            columns,
            file,
            rows,
            rows_sha256: sum,
        });
    }
    progress.done();
    let audit = copy_out(&client, &format!("COPY (SELECT * FROM levqor.backup_audit_log('{tenant_id}')) TO STDOUT")).await?;
    let chain = copy_out(&client, &format!("COPY (SELECT * FROM levqor.backup_audit_chain('{tenant_id}')) TO STDOUT")).await?;
    let audit_entries = archive::rows_checksum(&audit).0;
    w.add("audit/log.copy.zst", &archive::compress(&audit));
    w.add("audit/chain.copy.zst", &archive::compress(&chain));
    // The DDL, from the real pg_dump, of the same snapshot: the shared tables
    // (ddl.sql) and, for a schema tenant, its schema (ddl-schema.sql).
    let shared: Vec<TableEntry> = entries.iter().filter(|e| schema.as_deref() != Some(e.schema.as_str())).cloned().collect();
    let ddl = pg_dump_schema(cfg, &t, &snapshot, server_version, None, &shared).await?;
    w.add("ddl.sql", ddl.as_bytes());
    if let Some(s) = schema.as_deref() {
        let ddl = pg_dump_schema(cfg, &t, &snapshot, server_version, Some(s), &[]).await?;
        w.add("ddl-schema.sql", ddl.as_bytes());
    }
    w.add("catalog.json", &serde_json::to_vec_pretty(&catalog).expect("json"));
    client.batch_execute("COMMIT").await.map_err(pg_err)?;

    let now = Utc::now();
    let manifest = Manifest {
        format: archive::FORMAT,
        levqor_version: catalog.get("levqor_version").and_then(Value::as_str).unwrap_or_default().to_string(),
        sidecar_version: env!("CARGO_PKG_VERSION").into(),
        postgres_version_num: server_version,
        tenant_id: tenant_id.to_string(),
        slug: slug.clone(),
        isolation: tenant_row.get("isolation").and_then(Value::as_str).unwrap_or("shared").to_string(),
        schema,
        snapshot_at: catalog.get("snapshot_at").and_then(Value::as_str).unwrap_or_default().to_string(),
        created_at: now.to_rfc3339(),
        encrypted: key.is_some(),
        secrets_included: b.include_secrets,
        tables: entries,
        members: Vec::new(),
        audit_entries,
        warning: key.is_none().then(|| "not encrypted: set [backup] encryption_key_env".to_string()),
    };
    let (tar, manifest) = w.finish(manifest);
    let data = match &key {
        Some(k) => archive::encrypt(&tar, k),
        None => {
            tracing::warn!(tenant = %slug, "backup written in the clear: no [backup] encryption_key_env");
            tar
        }
    };
    let dir = dir.map(Path::to_path_buf).unwrap_or_else(|| b.dir.join(&slug));
    // UTC to the millisecond: two backups in one second do not collide.
    let name = format!("{slug}-{}.levqor.tar{}", now.format("%Y%m%dT%H%M%S%.3fZ"), if key.is_some() { ".enc" } else { "" });
    let path = archive::write_atomically(&dir, &name, &data).map_err(|e| format!("{}: {e}", dir.display()))?;
    // What was written is checked before it counts.
    archive::open(&path, key.as_ref())?;
    Ok(Taken {
        sha256: archive::sha256_hex(&data),
        bytes: data.len() as u64,
        path,
        rows: total_rows,
        manifest,
        elapsed: started.elapsed(),
    })
}

async fn pg_dump_schema(
    cfg: &Config,
    t: &Target,
    snapshot: &str,
    server_version: i32,
    schema: Option<&str>,
    tables: &[TableEntry],
) -> Result<String, String> {
    let pg_dump = cfg
        .backup
        .as_ref()
        .and_then(|b| b.pg_dump.clone())
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin/pg_dump"));
    let version = tokio::process::Command::new(&pg_dump).arg("--version").output().await.map_err(|e| format!("{}: {e}", pg_dump.display()))?;
    let version = String::from_utf8_lossy(&version.stdout).to_string();
    let major: i32 = version.split_whitespace().find_map(|w| w.split('.').next()?.parse().ok()).unwrap_or(0);
    if major != server_version / 10000 {
        return Err(format!(
            "{} is PostgreSQL {major}, the server {}: set [backup] pg_dump to the matching one",
            pg_dump.display(),
            server_version / 10000
        ));
    }
    let mut cmd = tokio::process::Command::new(&pg_dump);
    cmd.args(["--schema-only", "--no-owner", "--no-privileges", "--no-comments", "--snapshot", snapshot, "-d", &t.url]);
    match schema {
        Some(s) => {
            cmd.args(["-n", s]);
        }
        None => {
            for e in tables {
                cmd.args(["-t", &qualified(&e.schema, &e.name)]);
            }
        }
    }
    if let Some(p) = &t.password_env {
        cmd.env("PGPASSWORD", secret("backup password", p).map_err(|e| e.to_string())?.expose());
    }
    if tables.is_empty() && schema.is_none() {
        return Ok(String::new());
    }
    let out = cmd.output().await.map_err(|e| format!("pg_dump: {e}"))?;
    if !out.status.success() {
        return Err(format!("pg_dump failed: {}", String::from_utf8_lossy(&out.stderr).lines().next().unwrap_or("")));
    }
    // psql meta-commands (pg_dump's \restrict since 15.14) are not SQL: the
    // restore runs this text over the protocol, without psql.
    Ok(String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.starts_with('\\')).map(|l| format!("{l}\n")).collect())
}

async fn record(cfg: &Config, tenant: &str, kind: &str, taken: Option<&Taken>, status: &str, error: Option<&str>, detail: Value) {
    let t = target(cfg);
    let Ok(client) = connect(&t).await else { return };
    let id: Option<uuid::Uuid> = match uuid::Uuid::parse_str(tenant) {
        Ok(u) => Some(u),
        Err(_) => client
            .query_opt("SELECT tenant_id FROM levqor.backup_tenants() WHERE slug = $1", &[&tenant])
            .await
            .ok()
            .flatten()
            .map(|r| r.get(0))
            .or_else(|| taken.and_then(|t| uuid::Uuid::parse_str(&t.manifest.tenant_id).ok())),
    };
    let Some(id) = id else { return };
    let r = client
        .execute(
            "SELECT levqor.backup_record($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            &[
                &id,
                &kind,
                &taken.map(|t| t.path.display().to_string()),
                &taken.map(|t| t.bytes as i64),
                &taken.map(|t| t.sha256.clone()),
                &taken.map(|t| t.rows as i64),
                &taken.map(|t| t.elapsed.as_millis() as i64),
                &taken.map(|t| t.manifest.encrypted),
                &status,
                &error,
                &detail,
            ],
        )
        .await;
    if let Err(e) = r {
        tracing::warn!(error = %e, "could not record the backup in levqor.backups");
    }
}

/// Retention, after a good, verified backup: per tenant directory, the newest
/// archive of each of the last `keep_daily` days, and of each of the
/// `keep_weekly` weeks before them. The newest archive is always kept.
pub fn apply_retention(dir: &Path, slug: &str, keep_daily: usize, keep_weekly: usize) -> Vec<PathBuf> {
    let mut files: Vec<(chrono::NaiveDateTime, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let rest = name.strip_prefix(&format!("{slug}-"))?;
            let stamp = rest.split(".levqor.tar").next()?;
            if !name.contains(".levqor.tar") {
                return None;
            }
            let at = chrono::NaiveDateTime::parse_from_str(stamp, "%Y%m%dT%H%M%S%.3fZ")
                .or_else(|_| chrono::NaiveDateTime::parse_from_str(stamp, "%Y%m%dT%H%M%SZ"))
                .ok()?;
            Some((at, e.path()))
        })
        .collect();
    files.sort_by(|a, b| b.0.cmp(&a.0));
    let mut keep = std::collections::HashSet::new();
    let mut days = Vec::new();
    let mut weeks = Vec::new();
    for (at, path) in &files {
        let day = at.date();
        if days.len() < keep_daily {
            if !days.contains(&day) {
                days.push(day);
                keep.insert(path.clone());
            }
            continue;
        }
        let week = (chrono::Datelike::iso_week(&day).year(), chrono::Datelike::iso_week(&day).week());
        if weeks.len() < keep_weekly && !weeks.contains(&week) && !days.contains(&day) {
            weeks.push(week);
            keep.insert(path.clone());
        }
    }
    if let Some((_, newest)) = files.first() {
        keep.insert(newest.clone());
    }
    let mut removed = Vec::new();
    for (_, path) in files {
        if !keep.contains(&path) && std::fs::remove_file(&path).is_ok() {
            removed.push(path);
        }
    }
    removed
}

pub async fn cli_backup(cfg: &Config, tenant: &str, out: Option<PathBuf>) -> ExitCode {
    match take(cfg, tenant, out.as_deref()).await {
        Ok(t) => {
            record(cfg, tenant, "backup", Some(&t), "ok", None, json!({"tables": t.manifest.tables.len()})).await;
            if out.is_none() {
                if let Some(b) = &cfg.backup {
                    for r in apply_retention(&b.dir.join(&t.manifest.slug), &t.manifest.slug, b.keep_daily, b.keep_weekly) {
                        tracing::info!(file = %r.display(), "retention: removed");
                    }
                }
            }
            println!("tenant {} ({}): {} tables, {} rows, {} audit entries, {} bytes{}, in {:.1} s",
                t.manifest.slug, t.manifest.tenant_id, t.manifest.tables.len(), t.rows, t.manifest.audit_entries, t.bytes,
                if t.manifest.encrypted { ", encrypted" } else { ", NOT encrypted" }, t.elapsed.as_secs_f64());
            println!("{}", t.path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            record(cfg, tenant, "backup", None, "failed", Some(&e), json!({})).await;
            eprintln!("levqor-sidecar: backup of {tenant} failed: {e}");
            ExitCode::from(1)
        }
    }
}

pub fn cli_verify(cfg: Option<&Config>, from: &Path) -> ExitCode {
    let key = match key(cfg) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("levqor-sidecar: {e}");
            return ExitCode::from(2);
        }
    };
    match archive::open(from, key.as_ref()) {
        Ok(o) => {
            let rows: u64 = o.manifest.tables.iter().map(|t| t.rows).sum();
            println!(
                "{}: ok: tenant {} ({}), {} tables, {rows} rows, {} audit entries, {} files checked{}",
                from.display(),
                o.manifest.slug,
                o.manifest.tenant_id,
                o.manifest.tables.len(),
                o.manifest.audit_entries,
                o.manifest.members.len(),
                if o.manifest.encrypted { ", encrypted" } else { ", not encrypted" }
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("levqor-sidecar: {}: {e}", from.display());
            ExitCode::from(1)
        }
    }
}

/// What a restore did.
pub struct Restored {
    pub tenant: String,
    pub rows: u64,
    pub tables: usize,
    pub audit: String,
    pub elapsed: Duration,
}

#[derive(Debug)]
pub enum RestoreError {
    /// Refused before anything was written (bad archive, live tenant, usage).
    Refused(String),
    /// What was written did not match the manifest: rolled back.
    Mismatch(String),
    Failed(String),
}

impl std::fmt::Display for RestoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RestoreError::Refused(e) | RestoreError::Failed(e) => f.write_str(e),
            RestoreError::Mismatch(e) => write!(f, "the restored rows do not match the archive ({e}); rolled back"),
        }
    }
}

pub async fn restore(cfg: &Config, tenant: &str, from: &Path, into: Option<Target>, replace: bool) -> Result<Restored, RestoreError> {
    let started = Instant::now();
    let key = key(Some(cfg)).map_err(RestoreError::Refused)?;
    // Verified first: nothing is written from a bad archive.
    let opened = archive::open(from, key.as_ref()).map_err(RestoreError::Refused)?;
    let m = &opened.manifest;
    if tenant != m.slug && tenant != m.tenant_id {
        return Err(RestoreError::Refused(format!("the archive holds tenant {} ({}), not {tenant}", m.slug, m.tenant_id)));
    }
    let catalog: Value = serde_json::from_slice(opened.members.get("catalog.json").ok_or(RestoreError::Refused("no catalog".into()))?)
        .map_err(|e| RestoreError::Refused(format!("catalog: {e}")))?;
    let t = into.unwrap_or_else(|| target(cfg));
    let client = connect(&t).await.map_err(RestoreError::Failed)?;
    let installed: bool = client
        .query_one("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'levqor')", &[])
        .await
        .map_err(|e| RestoreError::Failed(pg_err(e)))?
        .get(0);
    if !installed {
        return Err(RestoreError::Refused("levqor is not installed in the target database".into()));
    }
    let fail = |e: tokio_postgres::Error| {
        let msg = pg_err(e);
        if msg.contains("SQLSTATE 55000") || msg.contains("SQLSTATE 23505") {
            RestoreError::Refused(msg)
        } else {
            RestoreError::Failed(msg)
        }
    };
    client.batch_execute("BEGIN").await.map_err(fail)?;
    let tenant_id: uuid::Uuid = client.query_one("SELECT levqor.restore_begin($1, $2)", &[&catalog, &replace]).await.map_err(fail)?.get(0);
    // Tables: there, cloned from the template (a schema tenant), or made from the archive's DDL.
    let names: Vec<String> = m.tables.iter().map(|e| e.table.clone()).collect();
    let ddl_of = |member: &str| String::from_utf8_lossy(opened.members.get(member).map(Vec::as_slice).unwrap_or_default()).into_owned();
    if let Some(schema) = &m.schema {
        let there: bool = client.query_one("SELECT levqor.restore_schema($1, $2)", &[&tenant_id, &names]).await.map_err(fail)?.get(0);
        if !there {
            // No such schema here and a template that does not match: its own DDL.
            client.batch_execute(&ddl_of("ddl-schema.sql")).await.map_err(fail)?;
            client.batch_execute("RESET ALL").await.map_err(fail)?;
            let made: bool = client.query_one("SELECT to_regnamespace($1) IS NOT NULL", &[&ident(schema)]).await.map_err(fail)?.get(0);
            if !made {
                let _ = client.batch_execute("ROLLBACK").await;
                return Err(RestoreError::Refused(format!("the archive has no DDL for schema {schema}")));
            }
        }
    }
    let mut missing = Vec::new();
    for e in m.tables.iter().filter(|e| m.schema.as_deref() != Some(e.schema.as_str())) {
        let there: bool = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&qualified(&e.schema, &e.name)])
            .await
            .map_err(fail)?
            .get(0);
        if !there {
            missing.push(e.table.clone());
        }
    }
    let shared_tables = m.tables.iter().filter(|e| m.schema.as_deref() != Some(e.schema.as_str())).count();
    if !missing.is_empty() {
        if missing.len() != shared_tables {
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(RestoreError::Refused(format!(
                "tables {} are missing here while the others exist: create them first",
                missing.join(", ")
            )));
        }
        client.batch_execute(&ddl_of("ddl.sql")).await.map_err(fail)?;
        // pg_dump's preamble SETs row_security off, an empty search_path and
        // more: back to the session's defaults before any row is written.
        client.batch_execute("RESET ALL").await.map_err(fail)?;
        for e in m.tables.iter().filter(|e| e.tenant_column.is_some()) {
            let tbl = qualified(&e.schema, &e.name);
            match &e.scope_column {
                Some(s) => client.execute("SELECT levqor.enable_tenancy($1::text::regclass, $2::text::name, $3::text::name)", &[&tbl, &e.tenant_column, s]).await,
                None => client.execute("SELECT levqor.enable_tenancy($1::text::regclass, $2::text::name)", &[&tbl, &e.tenant_column]).await,
            }
            .map_err(fail)?;
        }
    }
    // The audit trail first, so that its ids are free if they can be (see restore_audit).
    let cols = |tbl: &str| format!(
        "SELECT string_agg(format('%I %s', attname, format_type(atttypid, atttypmod)), ', ' ORDER BY attnum)
           FROM pg_attribute WHERE attrelid = '{tbl}'::regclass AND attnum > 0 AND NOT attisdropped"
    );
    let log_cols: String = client.query_one(&cols("levqor.audit_log"), &[]).await.map_err(fail)?.get(0);
    let chain_cols: String = client.query_one(&cols("levqor.audit_chain"), &[]).await.map_err(fail)?.get(0);
    client
        .batch_execute(&format!(
            "CREATE TEMP TABLE levqor_restore_audit ({log_cols}) ON COMMIT DROP;
             CREATE TEMP TABLE levqor_restore_chain ({chain_cols}) ON COMMIT DROP;"
        ))
        .await
        .map_err(fail)?;
    let member = |name: &str| -> Result<Vec<u8>, RestoreError> {
        archive::decompress(opened.members.get(name).map(Vec::as_slice).unwrap_or_default()).map_err(RestoreError::Refused)
    };
    copy_in(&client, "COPY levqor_restore_audit FROM STDIN", member("audit/log.copy.zst")?).await.map_err(RestoreError::Failed)?;
    copy_in(&client, "COPY levqor_restore_chain FROM STDIN", member("audit/chain.copy.zst")?).await.map_err(RestoreError::Failed)?;
    let head = catalog.get("audit_head").cloned().unwrap_or(Value::Null);
    let audit: String = client.query_one("SELECT levqor.restore_audit($1, $2)", &[&tenant_id, &head]).await.map_err(fail)?.get(0);

    // The rows, through the tenant's context: row level security checks each.
    client.query_one("SELECT levqor.backup_context($1, restore => true)", &[&tenant_id.to_string()]).await.map_err(fail)?;
    let progress = Progress::new(&format!("restore {}", m.slug), m.tables.len() as u64);
    let mut rows = 0;
    for (i, e) in m.tables.iter().enumerate() {
        let tbl = qualified(&e.schema, &e.name);
        let list = column_list(&e.columns);
        if replace {
            client.batch_execute(&format!("DELETE FROM {tbl}")).await.map_err(fail)?;
        }
        let types: String = client
            .query_one(
                "SELECT string_agg(format('%I %s', a.attname, format_type(a.atttypid, a.atttypmod)), ', ' ORDER BY x.o)
                   FROM unnest($2::text[]) WITH ORDINALITY AS x(name, o)
                   JOIN pg_attribute a ON a.attrelid = $1::text::regclass AND a.attname = x.name AND NOT a.attisdropped",
                &[&tbl, &e.columns],
            )
            .await
            .map_err(fail)?
            .get::<_, Option<String>>(0)
            .ok_or_else(|| RestoreError::Refused(format!("{tbl} here has none of the archive's columns")))?;
        let stage = format!("levqor_restore_t{i}");
        client.batch_execute(&format!("CREATE TEMP TABLE {stage} ({types}) ON COMMIT DROP")).await.map_err(fail)?;
        copy_in(&client, &format!("COPY {stage} ({list}) FROM STDIN"), member(&e.file)?).await.map_err(RestoreError::Failed)?;
        let n = client
            .execute(&format!("INSERT INTO {tbl} ({list}) OVERRIDING SYSTEM VALUE SELECT {list} FROM {stage}"), &[])
            .await
            .map_err(fail)?;
        client.execute("SELECT levqor.restore_sequences($1::text::regclass)", &[&tbl]).await.map_err(fail)?;
        rows += n;
        progress.table(&e.table, n);
    }
    progress.done();
    // What is there now must be what the archive holds, before it counts.
    for e in &m.tables {
        let data = copy_out(&client, &format!("COPY (SELECT {} FROM {}) TO STDOUT", column_list(&e.columns), qualified(&e.schema, &e.name)))
            .await
            .map_err(RestoreError::Failed)?;
        let (n, sum) = archive::rows_checksum(&data);
        if n != e.rows || sum != e.rows_sha256 {
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(RestoreError::Mismatch(format!("{}: {n} rows here, {} in the archive", e.table, e.rows)));
        }
    }
    let detail = json!({"archive": from.display().to_string(), "rows": rows, "tables": m.tables.len(), "replace": replace, "audit": audit});
    client.execute("SELECT levqor.restore_finish($1, $2)", &[&catalog, &detail]).await.map_err(fail)?;
    client.batch_execute("COMMIT").await.map_err(fail)?;
    Ok(Restored { tenant: m.slug.clone(), rows, tables: m.tables.len(), audit, elapsed: started.elapsed() })
}

pub async fn cli_restore(cfg: &Config, tenant: &str, from: &Path, into: Option<&str>, replace: bool) -> ExitCode {
    let into = into.map(|url| Target { url: url.to_string(), password_env: cfg.backup.as_ref().and_then(|b| b.password_env.clone()) });
    let elsewhere = into.is_some();
    match restore(cfg, tenant, from, into, replace).await {
        Ok(r) => {
            println!(
                "restored tenant {}: {} tables, {} rows, audit trail {}, in {:.1} s; rows and checksums match the archive",
                r.tenant, r.tables, r.rows, r.audit, r.elapsed.as_secs_f64()
            );
            if !elsewhere {
                let detail = json!({"archive": from.display().to_string(), "tables": r.tables, "replace": replace});
                record(cfg, &r.tenant, "restore", None, "ok", None, detail).await;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("levqor-sidecar: restore of {tenant}: {e}");
            if let RestoreError::Refused(why) = &e {
                if why.contains("--replace") || why.contains("exists here") {
                    eprintln!("hint: pass --replace to replace that tenant's rows (only its own), or --into another database");
                }
            }
            // Refused, or rolled back: nothing was changed; a failed check either way.
            ExitCode::from(1)
        }
    }
}

/// The GDPR export: `levqor.export_tenant` as one JSON file per table, plus
/// tenant.json, members.json, keys.json, audit_trail.json and a manifest.
pub async fn cli_export(cfg: &Config, tenant: &str, out: &Path) -> ExitCode {
    let result = async {
        let client = connect(&target(cfg)).await?;
        let rows = client.query("SELECT table_name, row_data FROM levqor.export_tenant($1)", &[&tenant]).await.map_err(pg_err)?;
        let mut files: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        let mut export_manifest = Value::Null;
        for r in rows {
            let table: String = r.get(0);
            let row: Value = r.get(1);
            let file = match table.as_str() {
                "manifest" => {
                    export_manifest = row;
                    continue;
                }
                "levqor.tenants" => "tenant.json".to_string(),
                "levqor.members" => "members.json".to_string(),
                "levqor.tenant_keys" => "keys.json".to_string(),
                "levqor.audit_log" => "audit_trail.json".to_string(),
                other => format!("tables/{other}.json"),
            };
            files.entry(file).or_default().push(row);
        }
        files.entry("members.json".into()).or_default();
        files.entry("audit_trail.json".into()).or_default();
        let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        let mut listing = Vec::new();
        for (name, rows) in &files {
            let data = if name == "tenant.json" {
                serde_json::to_vec_pretty(rows.first().unwrap_or(&Value::Null))
            } else {
                serde_json::to_vec_pretty(rows)
            }
            .expect("json");
            zip.start_file(name.as_str(), opts).map_err(|e| e.to_string())?;
            std::io::Write::write_all(&mut zip, &data).map_err(|e| e.to_string())?;
            listing.push(json!({"file": name, "rows": rows.len(), "sha256": archive::sha256_hex(&data)}));
        }
        let manifest = json!({"format": "levqor-export/1", "export": export_manifest, "files": listing,
                              "created_at": Utc::now().to_rfc3339()});
        zip.start_file("manifest.json", opts).map_err(|e| e.to_string())?;
        std::io::Write::write_all(&mut zip, &serde_json::to_vec_pretty(&manifest).expect("json")).map_err(|e| e.to_string())?;
        let bytes = zip.finish().map_err(|e| e.to_string())?.into_inner();
        let dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = out.file_name().ok_or("--out must name a file")?.to_string_lossy().into_owned();
        archive::write_atomically(dir, &name, &bytes).map_err(|e| format!("{}: {e}", out.display()))?;
        Ok::<usize, String>(files.len())
    }
    .await;
    match result {
        Ok(n) => {
            println!("{n} files and a manifest");
            println!("{}", out.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("levqor-sidecar: export of {tenant}: {e}");
            ExitCode::from(1)
        }
    }
}

/// The RTO the seeds set: a drill's restore must finish well within it.
pub const RTO: Duration = Duration::from_secs(30 * 60);

pub async fn cli_drill(cfg: &Config, tenant: &str) -> ExitCode {
    let Some(admin) = cfg.backup.as_ref().and_then(|b| b.admin_url.clone()) else {
        eprintln!("levqor-sidecar: dr-drill creates a scratch database: it needs [backup] admin_url (a role that may create databases and install levqor)");
        return ExitCode::from(2);
    };
    let started = Instant::now();
    let scratch = format!("levqor_drill_{}", Utc::now().format("%Y%m%d%H%M%S%3f"));
    let admin_target = Target { url: admin, password_env: cfg.backup.as_ref().and_then(|b| b.admin_password_env.clone()) };
    let outcome = async {
        let taken = take(cfg, tenant, Some(&std::env::temp_dir())).await.map_err(|e| format!("backup: {e}"))?;
        let t_backup = taken.elapsed;
        let v0 = Instant::now();
        archive::open(&taken.path, key(Some(cfg))?.as_ref()).map_err(|e| format!("verify: {e}"))?;
        let t_verify = v0.elapsed();
        let admin = connect(&admin_target).await?;
        admin.batch_execute(&format!("CREATE DATABASE {scratch}")).await.map_err(pg_err)?;
        let scratch_admin = connect(&admin_target.with_dbname(&scratch)).await?;
        scratch_admin
            .batch_execute(&format!(
                "CREATE EXTENSION levqor; GRANT CREATE ON DATABASE {scratch} TO levqor_backup; GRANT CREATE ON SCHEMA public TO levqor_backup;"
            ))
            .await
            .map_err(pg_err)?;
        drop(scratch_admin);
        let r0 = Instant::now();
        let restored = restore(cfg, tenant, &taken.path, Some(target(cfg).with_dbname(&scratch)), false)
            .await
            .map_err(|e| format!("restore: {e}"))?;
        let t_restore = r0.elapsed();
        let _ = std::fs::remove_file(&taken.path);
        Ok::<_, String>((taken, restored, t_backup, t_verify, t_restore))
    }
    .await;
    // The scratch database goes, whatever happened.
    if let Ok(admin) = connect(&admin_target).await {
        let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {scratch} WITH (FORCE)")).await;
    }
    let total = started.elapsed();
    match outcome {
        Ok((taken, restored, t_backup, t_verify, t_restore)) => {
            let within = t_restore < RTO;
            println!("dr-drill tenant {}", taken.manifest.slug);
            println!("backup_seconds: {:.3}", t_backup.as_secs_f64());
            println!("verify_seconds: {:.3}", t_verify.as_secs_f64());
            println!("restore_seconds: {:.3}", t_restore.as_secs_f64());
            println!("total_seconds: {:.3}", total.as_secs_f64());
            println!("rows: {}", restored.rows);
            println!("tables: {}", restored.tables);
            println!("target_seconds: {}", RTO.as_secs());
            println!("within_target: {within}");
            println!("result: {}", if within { "ok" } else { "slow" });
            let detail = json!({"backup_s": t_backup.as_secs_f64(), "verify_s": t_verify.as_secs_f64(),
                                "restore_s": t_restore.as_secs_f64(), "total_s": total.as_secs_f64(), "rows": restored.rows,
                                "within_target": within});
            record(cfg, tenant, "drill", Some(&taken), if within { "ok" } else { "failed" }, None, detail).await;
            if within { ExitCode::SUCCESS } else { ExitCode::from(1) }
        }
        Err(e) => {
            println!("dr-drill tenant {tenant}");
            println!("total_seconds: {:.3}", total.as_secs_f64());
            println!("result: failed");
            eprintln!("levqor-sidecar: dr-drill of {tenant}: {e}");
            record(cfg, tenant, "drill", None, "failed", Some(&e), json!({"total_s": total.as_secs_f64()})).await;
            ExitCode::from(1)
        }
    }
}
