//! One sealing batch, for `levqor.seal_audit()` (sql/audit.sql keeps the
//! watermark; this does the per-entry work).
//!
//! The sealer runs beside the writers, on the same cores, so its cost per
//! entry is part of what auditing costs. Here an entry is read once, its
//! canonical form is written straight from the tuple (the bytes
//! `levqor._audit_canonical` produces, which `verify_audit` recomputes in SQL:
//! every verification cross-checks this code), hashed, and its chain
//! positions appended in runs (one row per chain per 96 entries) with the
//! table AM, as the writers append entries.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::fmt::Write;

use pgrx::pg_sys;
use pgrx::prelude::*;
use sha2::{Digest, Sha256};

use crate::audit_direct::call1;

/// The columns of levqor.audit_log the canonical form covers, in its order.
const CANONICAL: [&str; 18] = [
    "id",
    "tenant_id",
    "at",
    "xid",
    "db_role",
    "user_id",
    "member_role",
    "application_name",
    "client_addr",
    "kind",
    "table_name",
    "operation",
    "pk",
    "old_row",
    "new_row",
    "changed",
    "event",
    "detail",
];

/// A string as PostgreSQL's JSON output escapes it (escape_json). Every
/// character it escapes is ASCII, so runs of others are copied whole.
fn json_string(out: &mut String, s: &str) {
    out.push('"');
    let bytes = s.as_bytes();
    let mut from = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escaped = match b {
            0x08 => "\\b",
            0x0c => "\\f",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b if b < 0x20 => "",
            _ => continue,
        };
        out.push_str(&s[from..i]);
        if escaped.is_empty() {
            let _ = write!(out, "\\u{:04x}", b);
        } else {
            out.push_str(escaped);
        }
        from = i + 1;
    }
    out.push_str(&s[from..]);
    out.push('"');
}

/// A uuid as its JSON string (lower-case hex, hyphenated, as uuid_out).
fn uuid_string(out: &mut String, u: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push('"');
    for (i, b) in u.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push('-');
        }
        out.push(HEX[(b >> 4) as usize] as char);
        out.push(HEX[(b & 15) as usize] as char);
    }
    out.push('"');
}

/// A text value as a JSON string, read in place.
unsafe fn text_json(out: &mut String, d: pg_sys::Datum) {
    let v = pg_sys::pg_detoast_datum_packed(d.cast_mut_ptr());
    json_string(out, &String::from_utf8_lossy(pgrx::varlena::varlena_to_byte_slice(v)));
}

/// jsonb's text output (jsonb_out), written straight from its binary form
/// (src/include/utils/jsonb.h): a container is a header word (count and
/// kind), one JEntry word per child (all keys before all values in an
/// object), then the children's data. A JEntry holds a child's type and its
/// length, or, every 32nd child, its end offset. Numbers and containers
/// start at the next 4-byte boundary.
mod jsonb_text {
    use super::json_string;
    use pgrx::pg_sys;
    use std::ffi::CStr;

    const COUNT: u32 = 0x0FFF_FFFF;
    const SCALAR: u32 = 0x1000_0000;
    const OBJECT: u32 = 0x2000_0000;
    const OFFLEN: u32 = 0x0FFF_FFFF;
    const TYPE: u32 = 0x7000_0000;
    const HAS_OFF: u32 = 0x8000_0000;
    const STRING: u32 = 0x0000_0000;
    const NUMERIC: u32 = 0x1000_0000;
    const FALSE: u32 = 0x2000_0000;
    const TRUE: u32 = 0x3000_0000;
    const NULL: u32 = 0x4000_0000;
    const CONTAINER: u32 = 0x5000_0000;

    unsafe fn word(p: *const u8) -> u32 {
        std::ptr::read_unaligned(p.cast::<u32>())
    }

    /// A jsonb datum's text, as jsonb_out gives it.
    pub unsafe fn write(out: &mut String, d: pg_sys::Datum) {
        // 4-byte header, in line: the root container follows it.
        let v = pg_sys::pg_detoast_datum(d.cast_mut_ptr()).cast::<u8>();
        container(out, v.add(4));
    }

    unsafe fn container(out: &mut String, c: *const u8) {
        let header = word(c);
        let count = (header & COUNT) as usize;
        let object = header & OBJECT != 0;
        let entries = if object { 2 * count } else { count };
        let children = c.add(4);
        let data = children.add(4 * entries);
        // Start offset and length of each child.
        let mut spans = Vec::with_capacity(entries);
        let mut start = 0usize;
        for i in 0..entries {
            let e = word(children.add(4 * i));
            let field = (e & OFFLEN) as usize;
            let end = if e & HAS_OFF != 0 { field } else { start + field };
            spans.push((e & TYPE, start, end - start));
            start = end;
        }
        let value = |out: &mut String, i: usize| {
            let (kind, off, len) = spans[i];
            let aligned = data.add((off + 3) & !3);
            match kind {
                STRING => json_string(out, &String::from_utf8_lossy(std::slice::from_raw_parts(data.add(off), len))),
                NUMERIC => {
                    let text = super::call1(pg_sys::numeric_out, pg_sys::Datum::from(aligned));
                    out.push_str(&CStr::from_ptr(text.cast_mut_ptr()).to_string_lossy());
                }
                FALSE => out.push_str("false"),
                TRUE => out.push_str("true"),
                NULL => out.push_str("null"),
                CONTAINER => container(out, aligned),
                _ => pgrx::error!("levqor: a jsonb value of unknown kind {kind:#x}"),
            }
        };
        if header & SCALAR != 0 {
            value(out, 0);
        } else if object {
            out.push('{');
            for i in 0..count {
                if i > 0 {
                    out.push_str(", ");
                }
                value(out, i);
                out.push_str(": ");
                value(out, count + i);
            }
            out.push('}');
        } else {
            out.push('[');
            for i in 0..count {
                if i > 0 {
                    out.push_str(", ");
                }
                value(out, i);
            }
            out.push(']');
        }
    }
}


/// to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US') as a JSON
/// string, or null where to_char gives NULL.
unsafe fn timestamp_utc(out: &mut String, ts: pg_sys::TimestampTz) {
    let mut tm: pg_sys::pg_tm = std::mem::zeroed();
    let mut fsec: pg_sys::fsec_t = 0;
    if ts == i64::MIN
        || ts == i64::MAX // -infinity / infinity
        || pg_sys::timestamp2tm(ts, std::ptr::null_mut(), &mut tm, &mut fsec, std::ptr::null_mut(), std::ptr::null_mut()) != 0
    {
        out.push_str("null");
        return;
    }
    let year = if tm.tm_year <= 0 { 1 - tm.tm_year } else { tm.tm_year };
    let _ = write!(
        out,
        "\"{year:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}\"",
        tm.tm_mon, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, fsec
    );
}

/// The canonical form of one entry at chain position `seq`, into `out`:
/// the text of jsonb_build_array(…) over the fields, as
/// `levqor._audit_canonical`.
unsafe fn canonical(out: &mut String, values: &[pg_sys::Datum], nulls: &[bool], cols: &[usize; 18], seq: i64) {
    out.clear();
    out.push('[');
    for (k, &col) in cols.iter().enumerate() {
        if k > 0 {
            out.push_str(", ");
        }
        if nulls[col] {
            out.push_str("null");
            continue;
        }
        let d = values[col];
        // By position in CANONICAL (a match on indices: names cost a string
        // comparison each).
        match k {
            0 => {
                let _ = write!(out, "{}", d.value() as i64);
            }
            1 | 5 => uuid_string(out, std::slice::from_raw_parts(d.cast_mut_ptr::<u8>(), 16)),
            2 => timestamp_utc(out, d.value() as i64),
            3 => {
                let _ = write!(out, "\"{}\"", d.value() as u64);
            }
            8 => text_json(out, call1(pg_sys::network_host, d)),
            12 | 13 | 14 | 17 => jsonb_text::write(out, d),
            15 => {
                let names = Vec::<Option<String>>::from_datum(d, false).unwrap_or_default();
                out.push('[');
                for (i, n) in names.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    match n {
                        Some(n) => json_string(out, n),
                        None => out.push_str("null"),
                    }
                }
                out.push(']');
            }
            _ => text_json(out, d),
        }
    }
    let _ = write!(out, ", {seq}]");
}

/// Seal, in id order, up to `max_entries` committed entries with ids above
/// `after` that no chain holds yet. Returns how many, and the last id.
#[pg_extern(volatile, parallel_unsafe)]
fn _seal_batch(
    after: i64,
    max_entries: i32,
) -> TableIterator<'static, (name!(sealed, i32), name!(last_id, Option<i64>))> {
    let (n, last) = Spi::connect_mut(|client| unsafe { seal_batch(client, after, max_entries) });
    TableIterator::once((n, last))
}

/// Positions one row of levqor.audit_chain holds at most (a run): 96 keeps
/// a run under 4 kB, two to a page.
const RUN: usize = 96;

unsafe fn seal_batch(client: &mut pgrx::spi::SpiClient<'_>, after: i64, max_entries: i32) -> (i32, Option<i64>) {
    let max_entries = max_entries.max(0) as usize;
    // The oldest entries above the watermark that no run holds. Those a
    // pass already sealed above the watermark are normally about one pass's
    // worth (the watermark follows behind): read as a set, and skipped as
    // the entries are read. A transaction left open holds the watermark, and
    // that set grows with everything sealed since; past ten batches' worth,
    // each entry is instead looked up in the runs from its id up (a scalar
    // subquery, so that the planner keeps it a per-entry index probe: as an
    // anti-join it may hash every run and test each pair).
    let cap = 10 * max_entries.max(1);
    let mut sealed: std::collections::HashSet<i64> = client
        .select(
            "SELECT x.id FROM levqor.audit_chain c, unnest(c.ids) AS x(id) WHERE c.last_id > $1 AND x.id > $1 LIMIT $2",
            None,
            &[after.into(), (cap as i64 + 1).into()],
        )
        .expect("levqor: read the recent chain positions")
        .filter_map(|r| r.get::<i64>(1).ok().flatten())
        .collect();
    let in_memory = sealed.len() <= cap;
    if !in_memory {
        sealed.clear();
    }
    // Literal bounds: planned for the few recent ids it reads.
    let sql = if in_memory {
        format!("SELECT a.* FROM levqor.audit_log a WHERE a.id > {after} ORDER BY a.id LIMIT {}", max_entries + sealed.len())
    } else {
        format!(
            "SELECT a.* FROM levqor.audit_log a
              WHERE a.id > {after}
                AND (SELECT true FROM levqor.audit_chain c
                      WHERE c.chain = coalesce(a.tenant_id, '00000000-0000-0000-0000-000000000000'::uuid)
                        AND c.last_id >= a.id AND c.ids[width_bucket(a.id, c.ids)] = a.id
                      ORDER BY c.last_id LIMIT 1) IS NULL
              ORDER BY a.id LIMIT {max_entries}"
        )
    };
    let sql = CString::new(sql).expect("no NUL");
    if pg_sys::SPI_execute(sql.as_ptr(), false, 0) != pg_sys::SPI_OK_SELECT as i32 {
        pgrx::error!("levqor: reading the unsealed audit entries failed");
    }
    let table = pg_sys::SPI_tuptable;
    let count = pg_sys::SPI_processed as usize;
    if count == 0 {
        return (0, None);
    }
    let desc = (*table).tupdesc;
    let natts = (*desc).natts as usize;
    let name_of = |i: usize| {
        let att = &*(*desc).attrs.as_ptr().add(i);
        CStr::from_ptr(att.attname.data.as_ptr()).to_string_lossy().into_owned()
    };
    let names: Vec<String> = (0..natts).map(name_of).collect();
    let col = |name: &str| names.iter().position(|n| n == name).expect("levqor.audit_log has its columns");
    let cols: [usize; 18] = std::array::from_fn(|k| col(CANONICAL[k]));

    // Entries, read before the next query replaces SPI_tuptable.
    let mut entries: Vec<(i64, pgrx::Uuid, Vec<pg_sys::Datum>, Vec<bool>)> = Vec::with_capacity(count.min(max_entries));
    for i in 0..count {
        if entries.len() == max_entries {
            break;
        }
        let tuple = *(*table).vals.add(i);
        let mut is_null = false;
        let id = pg_sys::heap_getattr(tuple, cols[0] as i32 + 1, desc, &mut is_null).value() as i64;
        if sealed.contains(&id) {
            continue;
        }
        // A copy in this connection's memory: the next query may free the table.
        let tuple = pg_sys::heap_copytuple(tuple);
        let mut values = vec![pg_sys::Datum::from(0); natts];
        let mut nulls = vec![false; natts];
        pg_sys::heap_deform_tuple(tuple, desc, values.as_mut_ptr(), nulls.as_mut_ptr());
        let chain =
            if nulls[cols[1]] { pgrx::Uuid::from_bytes([0; 16]) } else { pgrx::Uuid::from_datum(values[cols[1]], false).expect("a uuid") };
        entries.push((id, chain, values, nulls));
    }

    if entries.is_empty() {
        return (0, None);
    }

    // Each chain continues from its head.
    let mut chains: Vec<pgrx::Uuid> = entries.iter().map(|e| e.1).collect();
    chains.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    chains.dedup();
    let mut heads: HashMap<[u8; 16], (i64, Vec<u8>)> = HashMap::new();
    for row in client
        .select("SELECT chain, seq, hash FROM levqor.audit_heads WHERE chain = ANY ($1)", None, &[chains.clone().into()])
        .expect("levqor: read the chain heads")
    {
        let chain: pgrx::Uuid = row.get(1).ok().flatten().expect("a chain");
        let seq: i64 = row.get(2).ok().flatten().expect("a position");
        let hash: Vec<u8> = row.get(3).ok().flatten().expect("a hash");
        heads.insert(*chain.as_bytes(), (seq, hash));
    }

    // Hashed in id order; each chain's positions then go into runs.
    let sealed_at = pg_sys::GetCurrentTimestamp();
    let mut runs: HashMap<[u8; 16], Vec<(i64, i64, Vec<u8>)>> = HashMap::new();
    let mut text = String::with_capacity(1024);
    for (id, chain, values, nulls) in &entries {
        let head = heads.entry(*chain.as_bytes()).or_insert_with(|| (0, vec![0u8; 32]));
        let seq = head.0 + 1;
        let mut h = Sha256::new();
        h.update(&head.1);
        canonical(&mut text, values, nulls, &cols, seq);
        h.update(text.as_bytes());
        let hash = h.finalize().to_vec();
        *head = (seq, hash.clone());
        runs.entry(*chain.as_bytes()).or_default().push((seq, *id, hash));
    }

    let rel = pg_sys::table_open(crate::audit_direct::levqor_relation(c"audit_chain"), pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
    let rows = chains.iter().flat_map(|chain| {
        let positions = runs.remove(chain.as_bytes()).unwrap_or_default();
        let chain = *chain;
        positions
            .chunks(RUN)
            .map(|run| {
                let ids: Vec<i64> = run.iter().map(|p| p.1).collect();
                let hashes: Vec<u8> = run.iter().flat_map(|p| p.2.iter().copied()).collect();
                (
                    vec![
                        chain.into_datum().expect("a uuid"),
                        run[0].0.into_datum().expect("an int8"),
                        run[run.len() - 1].1.into_datum().expect("an int8"),
                        ids.into_datum().expect("an int8[]"),
                        hashes.as_slice().into_datum().expect("a bytea"),
                        pg_sys::Datum::from(sealed_at),
                    ],
                    vec![false; 6],
                )
            })
            .collect::<Vec<_>>()
    });
    crate::audit_direct::append_open(rel, rows);
    pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);

    let (mut hc, mut hs, mut hh) = (Vec::new(), Vec::new(), Vec::new());
    for c in &chains {
        let (seq, hash) = heads.remove(c.as_bytes()).expect("each chain has a head now");
        hc.push(*c);
        hs.push(seq);
        hh.push(hash);
    }
    client
        .update(
            "INSERT INTO levqor.audit_heads AS hd (chain, seq, hash)
             SELECT * FROM unnest($1::uuid[], $2::int8[], $3::bytea[])
             ON CONFLICT (chain) DO UPDATE SET seq = EXCLUDED.seq, hash = EXCLUDED.hash, updated_at = now()",
            None,
            &[hc.into(), hs.into(), hh.into()],
        )
        .expect("levqor: move the chain heads");
    (entries.len() as i32, entries.last().map(|e| e.0))
}
