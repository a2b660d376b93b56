//! One sealing batch, for `levqor.seal_audit()` (sql/audit.sql keeps the
//! watermark; this does the per-entry work).
//!
//! The sealer runs beside the writers, on the same cores, so its cost per
//! entry is part of what auditing costs. Here an entry is read once, in
//! place, its canonical form is written straight from the tuple (the bytes
//! `levqor._audit_canonical` produces, which `verify_audit` recomputes in SQL:
//! every verification cross-checks this code), hashed, and its chain
//! positions appended in runs (one row per chain per 96 entries) with the
//! table AM, as the writers append entries.

use std::collections::HashMap;
use std::ffi::{CStr, CString};

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

/// An integer in decimal (what int8out writes).
fn push_int(out: &mut Vec<u8>, v: i64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = v.unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if v < 0 {
        out.push(b'-');
    }
    out.extend_from_slice(&digits[i..]);
}

/// `v` in decimal, zero-padded to at least `width` digits.
fn push_padded(out: &mut Vec<u8>, v: u32, width: usize) {
    let mut digits = [0u8; 10];
    let mut i = digits.len();
    let mut n = v;
    while n > 0 || digits.len() - i < width {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.extend_from_slice(&digits[i..]);
}

/// Lower-case hex digits, as uuid_out and escape_json write them.
const HEX: &[u8; 16] = b"0123456789abcdef";

/// A string as PostgreSQL's JSON output escapes it (escape_json), on the
/// server encoding's bytes. Every byte it escapes is ASCII, which no byte
/// of a multibyte character is in the encodings a server may use, so runs
/// of others are copied whole.
fn json_string(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    let mut from = 0;
    for (i, &b) in s.iter().enumerate() {
        let escaped: &[u8] = match b {
            0x08 => b"\\b",
            0x0c => b"\\f",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b if b < 0x20 => b"",
            _ => continue,
        };
        out.extend_from_slice(&s[from..i]);
        if escaped.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[(b >> 4) as usize]);
            out.push(HEX[(b & 15) as usize]);
        } else {
            out.extend_from_slice(escaped);
        }
        from = i + 1;
    }
    out.extend_from_slice(&s[from..]);
    out.push(b'"');
}

/// A uuid as its JSON string (lower-case hex, hyphenated, as uuid_out).
pub(crate) fn uuid_string(out: &mut Vec<u8>, u: &[u8]) {
    out.push(b'"');
    for (i, b) in u.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push(b'-');
        }
        out.push(HEX[(b >> 4) as usize]);
        out.push(HEX[(b & 15) as usize]);
    }
    out.push(b'"');
}

/// The bytes of a text (or bytea-like) datum, in place unless compressed or
/// stored out of line.
unsafe fn text_bytes<'a>(d: pg_sys::Datum) -> &'a [u8] {
    let v = pg_sys::pg_detoast_datum_packed(d.cast_mut_ptr());
    pgrx::varlena::varlena_to_byte_slice(v)
}

/// A text value as a JSON string.
unsafe fn text_json(out: &mut Vec<u8>, d: pg_sys::Datum) {
    json_string(out, text_bytes(d));
}

/// A numeric's text, as numeric_out writes it (get_str_from_var), from its
/// on-disk form (src/backend/utils/adt/numeric.c): a varlena whose first
/// 16-bit word is a short header (sign, display scale and weight in one) or
/// the sign and display scale of a long one, then the weight, then base
/// 10000 digits. NaN and the infinities, which jsonb never holds, go to
/// numeric_out itself.
unsafe fn numeric_text(out: &mut Vec<u8>, p: *const u8) {
    let u16_at = |at: usize| u16::from_le_bytes([*p.add(at), *p.add(at + 1)]);
    // Varlena header: 1 byte (packed) or 4, little-endian layout.
    let (size, hdr) = if *p & 1 == 1 {
        ((*p >> 1) as usize, 1)
    } else {
        ((u32::from_le_bytes([*p, *p.add(1), *p.add(2), *p.add(3)]) >> 2) as usize, 4)
    };
    let first = if size > hdr { u16_at(hdr) } else { 0 };
    if !cfg!(target_endian = "little") || first & 0xC000 == 0xC000 {
        // Special value (or a platform this reader was not written for):
        // numeric_out, on an aligned copy.
        let copy = pg_sys::palloc(size).cast::<u8>();
        std::ptr::copy_nonoverlapping(p, copy, size);
        let text = call1(pg_sys::numeric_out, pg_sys::Datum::from(copy));
        out.extend_from_slice(CStr::from_ptr(text.cast_mut_ptr()).to_bytes());
        return;
    }
    let (negative, dscale, weight, digits_at) = if size <= hdr {
        (false, 0usize, 0i32, hdr) // no header word: zero
    } else if first & 0x8000 != 0 {
        // Short: sign 0x2000, dscale 0x1F80 >> 7, weight sign 0x0040, weight 0x003F.
        let weight = (first & 0x003F) as i32 | if first & 0x0040 != 0 { !0x003F } else { 0 };
        (first & 0x2000 != 0, ((first & 0x1F80) >> 7) as usize, weight, hdr + 2)
    } else {
        (first & 0xC000 == 0x4000, (first & 0x3FFF) as usize, u16_at(hdr + 2) as i16 as i32, hdr + 4)
    };
    let ndigits = (size.saturating_sub(digits_at) / 2) as i32;
    let digit = |d: i32| if d >= 0 && d < ndigits { u16_at(digits_at + 2 * d as usize) } else { 0 };
    if negative {
        out.push(b'-');
    }
    let mut d: i32;
    if weight < 0 {
        d = weight + 1;
        out.push(b'0');
    } else {
        d = 0;
        while d <= weight {
            let dig = digit(d);
            // The first base-10000 digit without its leading zeroes.
            let parts = [dig / 1000, dig / 100 % 10, dig / 10 % 10, dig % 10];
            let mut putit = d > 0;
            for (k, &x) in parts.iter().enumerate() {
                putit |= x > 0 || k == 3;
                if putit {
                    out.push(b'0' + x as u8);
                }
            }
            d += 1;
        }
    }
    if dscale > 0 {
        out.push(b'.');
        let mut written = 0;
        while written < dscale {
            let dig = digit(d);
            for x in [dig / 1000, dig / 100 % 10, dig / 10 % 10, dig % 10] {
                if written < dscale {
                    out.push(b'0' + x as u8);
                    written += 1;
                }
            }
            d += 1;
        }
    }
}

/// jsonb's text output (jsonb_out), written straight from its binary form
/// (src/include/utils/jsonb.h): a container is a header word (count and
/// kind), one JEntry word per child (all keys before all values in an
/// object), then the children's data. A JEntry holds a child's type and its
/// length, or, every 32nd child, its end offset. Numbers and containers
/// start at the next 4-byte boundary, counted from the container (which
/// lies at a 4-byte boundary of the value; the value itself may be packed
/// behind a 1-byte header, so words are read unaligned).
mod jsonb_text {
    use super::{json_string, numeric_text};
    use pgrx::pg_sys;

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
    pub unsafe fn write(out: &mut Vec<u8>, d: pg_sys::Datum) {
        let v = pg_sys::pg_detoast_datum_packed(d.cast_mut_ptr());
        container(out, pgrx::varlena::vardata_any(v).cast());
    }

    /// Where a container's i-th child ends: lengths summed back to the
    /// nearest stored offset (getJsonbOffset).
    unsafe fn end(children: *const u8, i: usize) -> usize {
        let mut total = 0usize;
        let mut k = i as isize;
        while k >= 0 {
            let e = word(children.add(4 * k as usize));
            total += (e & OFFLEN) as usize;
            if e & HAS_OFF != 0 {
                break;
            }
            k -= 1;
        }
        total
    }

    unsafe fn container(out: &mut Vec<u8>, c: *const u8) {
        let header = word(c);
        let count = (header & COUNT) as usize;
        let object = header & OBJECT != 0;
        let children = c.add(4);
        let entries = if object { 2 * count } else { count };
        let data = children.add(4 * entries);
        // Children are visited in order, so each start is the last end.
        let value = |out: &mut Vec<u8>, i: usize, start: usize| -> usize {
            let e = word(children.add(4 * i));
            let field = (e & OFFLEN) as usize;
            let stop = if e & HAS_OFF != 0 { field } else { start + field };
            let aligned = data.add((start + 3) & !3);
            match e & TYPE {
                STRING => json_string(out, std::slice::from_raw_parts(data.add(start), stop - start)),
                NUMERIC => numeric_text(out, aligned),
                FALSE => out.extend_from_slice(b"false"),
                TRUE => out.extend_from_slice(b"true"),
                NULL => out.extend_from_slice(b"null"),
                CONTAINER => container(out, aligned),
                kind => pgrx::error!("levqor: a jsonb value of unknown kind {kind:#x}"),
            }
            stop
        };
        if header & SCALAR != 0 {
            value(out, 0, 0);
        } else if object {
            // Keys come first in the data, values after all keys: walk both.
            let mut key_at = 0usize;
            let mut value_at = if count > 0 { end(children, count - 1) } else { 0 };
            out.push(b'{');
            for i in 0..count {
                if i > 0 {
                    out.extend_from_slice(b", ");
                }
                key_at = value(out, i, key_at);
                out.extend_from_slice(b": ");
                value_at = value(out, count + i, value_at);
            }
            out.push(b'}');
        } else {
            out.push(b'[');
            let mut next = 0usize;
            for i in 0..count {
                if i > 0 {
                    out.extend_from_slice(b", ");
                }
                next = value(out, i, next);
            }
            out.push(b']');
        }
    }
}

/// to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US') as a JSON
/// string, or null where to_char gives NULL.
unsafe fn timestamp_utc(out: &mut Vec<u8>, ts: pg_sys::TimestampTz) {
    let mut tm: pg_sys::pg_tm = std::mem::zeroed();
    let mut fsec: pg_sys::fsec_t = 0;
    if ts == i64::MIN
        || ts == i64::MAX // -infinity / infinity
        || pg_sys::timestamp2tm(ts, std::ptr::null_mut(), &mut tm, &mut fsec, std::ptr::null_mut(), std::ptr::null_mut()) != 0
    {
        out.extend_from_slice(b"null");
        return;
    }
    let year = if tm.tm_year <= 0 { 1 - tm.tm_year } else { tm.tm_year };
    out.push(b'"');
    push_padded(out, year as u32, 4);
    for (sep, v) in [(b'-', tm.tm_mon), (b'-', tm.tm_mday), (b'T', tm.tm_hour), (b':', tm.tm_min), (b':', tm.tm_sec)] {
        out.push(sep);
        push_padded(out, v as u32, 2);
    }
    out.push(b'.');
    push_padded(out, fsec as u32, 6);
    out.push(b'"');
}

/// host(client_addr) of the last entry: most entries share a few addresses.
#[derive(Default)]
struct HostCache {
    inet: Vec<u8>,
    json: Vec<u8>,
}

/// The canonical form of one entry without its chain position, into `out`:
/// the text of jsonb_build_array(…) over the fields, as
/// `levqor._audit_canonical`, up to the position (", seq]" follows).
unsafe fn canonical(out: &mut Vec<u8>, values: &[pg_sys::Datum], nulls: &[bool], cols: &[usize; 18], hosts: &mut HostCache) {
    out.push(b'[');
    for (k, &col) in cols.iter().enumerate() {
        if k > 0 {
            out.extend_from_slice(b", ");
        }
        if nulls[col] {
            out.extend_from_slice(b"null");
            continue;
        }
        let d = values[col];
        // By position in CANONICAL (a match on indices: names cost a string
        // comparison each).
        match k {
            0 => push_int(out, d.value() as i64),
            1 | 5 => uuid_string(out, std::slice::from_raw_parts(d.cast_mut_ptr::<u8>(), 16)),
            2 => timestamp_utc(out, d.value() as i64),
            3 => {
                out.push(b'"');
                push_int(out, d.value() as u64 as i64);
                out.push(b'"');
            }
            8 => {
                let inet = text_bytes(d);
                if inet != hosts.inet.as_slice() || hosts.json.is_empty() {
                    hosts.inet = inet.to_vec();
                    hosts.json.clear();
                    text_json(&mut hosts.json, call1(pg_sys::network_host, d));
                }
                out.extend_from_slice(&hosts.json);
            }
            12 | 13 | 14 | 17 => jsonb_text::write(out, d),
            15 => {
                // text[] as to_jsonb gives it.
                let (mut elems, mut isnull, mut n) = (std::ptr::null_mut(), std::ptr::null_mut(), 0);
                let arr = pg_sys::pg_detoast_datum(d.cast_mut_ptr()).cast::<pg_sys::ArrayType>();
                pg_sys::deconstruct_array(arr, pg_sys::TEXTOID, -1, false, b'i' as _, &mut elems, &mut isnull, &mut n);
                out.push(b'[');
                for i in 0..n.max(0) as usize {
                    if i > 0 {
                        out.extend_from_slice(b", ");
                    }
                    if *isnull.add(i) {
                        out.extend_from_slice(b"null");
                    } else {
                        text_json(out, *elems.add(i));
                    }
                }
                out.push(b']');
            }
            _ => text_json(out, d),
        }
    }
}

/// Where each CANONICAL column is in levqor.audit_log's rows.
unsafe fn columns(desc: pg_sys::TupleDesc) -> [usize; 18] {
    let natts = (*desc).natts as usize;
    let names: Vec<&[u8]> =
        (0..natts).map(|i| CStr::from_ptr((*(*desc).attrs.as_ptr().add(i)).attname.data.as_ptr()).to_bytes()).collect();
    std::array::from_fn(|k| {
        names.iter().position(|n| *n == CANONICAL[k].as_bytes()).expect("levqor.audit_log has its columns")
    })
}

/// The entries a batch seals: each one's id, chain and canonical form up to
/// its position, as UTF-8 (convert_to in the SQL form). The forms are kept
/// end to end in `text`, each entry's ending where the next begins.
struct Reader {
    max: usize,
    utf8: bool,
    entries: Vec<(i64, [u8; 16], usize)>,
    text: Vec<u8>,
    one: Vec<u8>,
    hosts: HostCache,
    /// What reading a value allocates (a compressed row's copy, host()'s
    /// text) lives for that entry only.
    scratch: pgrx::PgMemoryContexts,
}

impl Reader {
    unsafe fn new(max: usize) -> Self {
        Reader {
            max,
            // SQL_ASCII too: its bytes are taken as they are (convert_to
            // passes them through when they are valid UTF-8; when they are
            // not, verify_audit reports the error, while sealing carries on).
            utf8: matches!(pg_sys::GetDatabaseEncoding() as u32, pg_sys::pg_enc::PG_UTF8 | pg_sys::pg_enc::PG_SQL_ASCII),
            entries: Vec::with_capacity(max.min(100_000)),
            text: Vec::with_capacity(max.min(100_000) * 512),
            one: Vec::with_capacity(1024),
            hosts: HostCache::default(),
            scratch: pgrx::PgMemoryContexts::new("levqor seal entry"),
        }
    }

    fn full(&self) -> bool {
        self.entries.len() >= self.max
    }

    /// One entry, read while its tuple lives.
    unsafe fn take(&mut self, values: &[pg_sys::Datum], nulls: &[bool], cols: &[usize; 18]) {
        if self.full() {
            return;
        }
        let id = values[cols[0]].value() as i64;
        let mut chain = [0u8; 16];
        if !nulls[cols[1]] {
            chain.copy_from_slice(std::slice::from_raw_parts(values[cols[1]].cast_mut_ptr::<u8>(), 16));
        }
        let Reader { utf8, text, one, hosts, scratch, .. } = self;
        scratch.switch_to(|_| {
            if *utf8 {
                canonical(text, values, nulls, cols, hosts);
            } else {
                one.clear();
                canonical(one, values, nulls, cols, hosts);
                let converted = pg_sys::pg_server_to_any(one.as_ptr().cast(), one.len() as i32, pg_sys::pg_enc::PG_UTF8 as i32);
                if converted.cast::<u8>().cast_const() == one.as_ptr() {
                    text.extend_from_slice(one);
                } else {
                    text.extend_from_slice(CStr::from_ptr(converted).to_bytes());
                }
            }
        });
        scratch.reset();
        self.entries.push((id, chain, self.text.len()));
    }
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
    // worth (the watermark follows behind): skipped as the entries are read,
    // on the index's key, without reading their rows. A transaction left
    // open holds the watermark, and that set grows with everything sealed
    // since; past ten batches' worth, each entry is instead looked up in the
    // runs from its id up (a scalar subquery, so that the planner keeps it a
    // per-entry index probe: as an anti-join it may hash every run and test
    // each pair).
    let cap = 10 * max_entries.max(1);
    // Read as the runs' id arrays (a few dozen rows), sorted: the entries
    // come in id order, so one cursor walks both. Ordered by last_id so that
    // the plan is the scan of its index whatever the statistics say: a
    // sequential scan here reads every run ever sealed, every pass.
    let mut sealed: Vec<i64> = Vec::new();
    let mut runs_read = 0usize;
    for row in client
        .select(
            "SELECT c.ids FROM levqor.audit_chain c WHERE c.last_id > $1 ORDER BY c.last_id LIMIT $2",
            None,
            &[after.into(), (cap as i64 + 1).into()],
        )
        .expect("levqor: read the recent chain positions")
    {
        runs_read += 1;
        if let Some(ids) = row.get::<pgrx::Array<i64>>(1).ok().flatten() {
            sealed.extend(ids.iter().flatten().filter(|&id| id > after));
        }
    }
    let in_memory = runs_read <= cap && sealed.len() <= cap;
    if in_memory {
        sealed.sort_unstable();
    } else {
        sealed.clear();
    }
    let mut reader = Reader::new(max_entries);
    if in_memory {
        // The entries above the watermark, in id order, straight from the
        // primary key: each is read in its pinned buffer, skipping those
        // already sealed.
        let log = pg_sys::table_open(crate::audit_direct::target().0, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let pk = pg_sys::RelationGetPrimaryKeyIndex(log);
        if pk == pg_sys::InvalidOid {
            pgrx::error!("levqor.audit_log has no primary key");
        }
        let index = pg_sys::index_open(pk, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let desc = (*log).rd_att;
        let natts = (*desc).natts as usize;
        let cols = columns(desc);
        let mut key: pg_sys::ScanKeyData = std::mem::zeroed();
        pg_sys::ScanKeyInit(
            &mut key,
            1,
            pg_sys::BTGreaterStrategyNumber as pg_sys::StrategyNumber,
            pg_sys::Oid::from(pg_sys::F_INT8GT),
            pg_sys::Datum::from(after),
        );
        let scan = pg_sys::index_beginscan(log, index, pg_sys::GetActiveSnapshot(), 1, 0);
        // The index tuples' keys are read below; btree makes room for them
        // at rescan.
        (*scan).xs_want_itup = true;
        pg_sys::index_rescan(scan, &mut key, 1, std::ptr::null_mut(), 0);
        let slot = pg_sys::table_slot_create(log, std::ptr::null_mut());
        // As index_getnext_slot, but an id already sealed is skipped on the
        // index tuple's key, without reading its row.
        let mut next_sealed = 0usize;
        while !reader.full() {
            if !(*scan).xs_heap_continue {
                if pg_sys::index_getnext_tid(scan, pg_sys::ScanDirection::ForwardScanDirection).is_null() {
                    break;
                }
                // The primary key's one column, never null.
                let id = pg_sys::nocache_index_getattr((*scan).xs_itup, 1, (*scan).xs_itupdesc).value() as i64;
                while next_sealed < sealed.len() && sealed[next_sealed] < id {
                    next_sealed += 1;
                }
                if sealed.get(next_sealed) == Some(&id) {
                    continue;
                }
            }
            if !pg_sys::index_fetch_heap(scan, slot) {
                continue;
            }
            pg_sys::slot_getallattrs(slot);
            let values = std::slice::from_raw_parts((*slot).tts_values, natts);
            let nulls = std::slice::from_raw_parts((*slot).tts_isnull, natts);
            reader.take(values, nulls, &cols);
        }
        pg_sys::ExecDropSingleTupleTableSlot(slot);
        pg_sys::index_endscan(scan);
        pg_sys::index_close(index, pg_sys::NoLock as pg_sys::LOCKMODE);
        pg_sys::table_close(log, pg_sys::NoLock as pg_sys::LOCKMODE);
    } else {
        let sql = format!(
            "SELECT a.* FROM levqor.audit_log a
              WHERE a.id > {after}
                AND (SELECT true FROM levqor.audit_chain c
                      WHERE c.chain = coalesce(a.tenant_id, '00000000-0000-0000-0000-000000000000'::uuid)
                        AND c.last_id >= a.id AND c.ids[width_bucket(a.id, c.ids)] = a.id
                      ORDER BY c.last_id LIMIT 1) IS NULL
              ORDER BY a.id LIMIT {max_entries}"
        );
        let sql = CString::new(sql).expect("no NUL");
        if pg_sys::SPI_execute(sql.as_ptr(), false, 0) != pg_sys::SPI_OK_SELECT as i32 {
            pgrx::error!("levqor: reading the unsealed audit entries failed");
        }
        let table = pg_sys::SPI_tuptable;
        let desc = (*table).tupdesc;
        let natts = (*desc).natts as usize;
        let cols = columns(desc);
        let mut values = vec![pg_sys::Datum::from(0); natts];
        let mut nulls = vec![false; natts];
        for i in 0..pg_sys::SPI_processed as usize {
            pg_sys::heap_deform_tuple(*(*table).vals.add(i), desc, values.as_mut_ptr(), nulls.as_mut_ptr());
            reader.take(&values, &nulls, &cols);
        }
    }
    let Reader { entries, text, .. } = reader;

    if entries.is_empty() {
        return (0, None);
    }

    // Each chain continues from its head.
    let mut chains: Vec<[u8; 16]> = entries.iter().map(|e| e.1).collect();
    chains.sort_unstable();
    chains.dedup();
    let mut heads: HashMap<[u8; 16], (i64, [u8; 32])> = HashMap::new();
    let chain_ids: Vec<pgrx::Uuid> = chains.iter().map(|c| pgrx::Uuid::from_bytes(*c)).collect();
    for row in client
        .select("SELECT chain, seq, hash FROM levqor.audit_heads WHERE chain = ANY ($1)", None, &[chain_ids.into()])
        .expect("levqor: read the chain heads")
    {
        let chain: pgrx::Uuid = row.get(1).ok().flatten().expect("a chain");
        let seq: i64 = row.get(2).ok().flatten().expect("a position");
        let hash: Vec<u8> = row.get(3).ok().flatten().expect("a hash");
        let hash: [u8; 32] = hash.try_into().unwrap_or_else(|_| pgrx::error!("levqor: a chain head's hash is not 32 bytes"));
        heads.insert(*chain.as_bytes(), (seq, hash));
    }

    // Hashed in id order; each chain's positions then go into runs.
    let sealed_at = pg_sys::GetCurrentTimestamp();
    let mut runs: HashMap<[u8; 16], Vec<(i64, i64, [u8; 32])>> = HashMap::new();
    let mut tail = Vec::with_capacity(24);
    let mut start = 0;
    for &(id, chain, end) in &entries {
        let head = heads.entry(chain).or_insert((0, [0u8; 32]));
        let seq = head.0 + 1;
        tail.clear();
        tail.extend_from_slice(b", ");
        push_int(&mut tail, seq);
        tail.push(b']');
        let mut h = Sha256::new();
        h.update(head.1);
        h.update(&text[start..end]);
        h.update(&tail);
        let hash: [u8; 32] = h.finalize().into();
        *head = (seq, hash);
        runs.entry(chain).or_default().push((seq, id, hash));
        start = end;
    }

    let rel = pg_sys::table_open(crate::audit_direct::levqor_relation(c"audit_chain"), pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
    let rows = chains.iter().flat_map(|chain| {
        let positions = runs.remove(chain).unwrap_or_default();
        let chain = pgrx::Uuid::from_bytes(*chain);
        positions
            .chunks(RUN)
            .map(|run| {
                let ids: Vec<i64> = run.iter().map(|p| p.1).collect();
                let hashes: Vec<u8> = run.iter().flat_map(|p| p.2).collect();
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
        let (seq, hash) = heads.remove(c).expect("each chain has a head now");
        hc.push(pgrx::Uuid::from_bytes(*c));
        hs.push(seq);
        hh.push(hash.to_vec());
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

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use super::*;

    /// jsonb_out's text and ours for one jsonb literal, both as the value
    /// is in memory (4-byte header) and packed behind a 1-byte header, as a
    /// short value is on disk.
    unsafe fn both(literal: &str) -> (String, Vec<String>) {
        let c = CString::new(literal).unwrap();
        let d = call1(pg_sys::jsonb_in, pg_sys::Datum::from(c.as_ptr()));
        let expected = CStr::from_ptr(call1(pg_sys::jsonb_out, d).cast_mut_ptr()).to_string_lossy().into_owned();
        let mut ours = Vec::new();
        let mut out = Vec::new();
        jsonb_text::write(&mut out, d);
        ours.push(String::from_utf8(out).unwrap());
        let bytes = pgrx::varlena::varlena_to_byte_slice(d.cast_mut_ptr());
        if bytes.len() + 1 <= 127 {
            let packed = pg_sys::palloc(bytes.len() + 1).cast::<u8>();
            *packed = (((bytes.len() + 1) as u8) << 1) | 1;
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), packed.add(1), bytes.len());
            let mut out = Vec::new();
            jsonb_text::write(&mut out, pg_sys::Datum::from(packed));
            ours.push(String::from_utf8(out).unwrap());
        }
        (expected, ours)
    }

    #[pg_test]
    fn numbers_come_out_as_numeric_out_writes_them() {
        let mut numbers: Vec<String> = [
            "0", "-0", "0.000", "-0.000", "1", "-1", "10000", "9999.9999", "100000000", "0.00010000", "3.000", "-12.5",
            "1e-20", "-1.5e-10", "1e100", "1e200", "1e300", "-1e-100", "1.5e-70", "123456789012345678901234567890.5",
            "0.1", "0.01", "0.001", "0.0001", "0.00001", "99999999999999999999", "-2147483648", "9223372036854775807",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // Every scale and weight up to the short form's limits and past them.
        numbers.extend(
            Spi::connect(|c| {
                c.select(
                    "SELECT round((random() - 0.5)::numeric * 10::numeric ^ (g % 90 - 45), g % 80)::text FROM generate_series(1, 3000) g",
                    None,
                    &[],
                )
                .unwrap()
                .map(|r| r.get::<String>(1).unwrap().unwrap())
                .collect::<Vec<_>>()
            }),
        );
        for n in &numbers {
            let (expected, ours) = unsafe { both(n) };
            assert!(ours.iter().all(|o| *o == expected), "{n}: jsonb_out {expected}, ours {ours:?}");
        }
        // All at once: one array past 32 elements (stored offsets).
        let all = format!("[{}]", numbers.join(", "));
        let (expected, ours) = unsafe { both(&all) };
        assert_eq!(ours[0], expected);
    }

    #[pg_test]
    fn containers_come_out_as_jsonb_out_writes_them() {
        for literal in [
            "{}", "[]", "null", "true", "\"s\"", "[[], {}, [[]]]", "{\"b\": 1, \"a\": [true, false, null], \"\": \"\"}",
            "{\"k\": \"quote \\\" back \\\\ nl \\n tab \\t ctl \\u0001 é 😀\"}",
        ] {
            let (expected, ours) = unsafe { both(literal) };
            assert!(ours.iter().all(|o| *o == expected), "{literal}: jsonb_out {expected}, ours {ours:?}");
        }
        let wide = format!("{{{}}}", (0..100).map(|i| format!("\"k{i}\": [{i}, \"{}\"]", "x".repeat(i))).collect::<Vec<_>>().join(", "));
        let (expected, ours) = unsafe { both(&wide) };
        assert_eq!(ours[0], expected);
    }

    #[pg_test]
    fn integers_and_padding() {
        for v in [0i64, 7, -7, 10, 99, 100, i64::MAX, i64::MIN, 1_000_000] {
            let mut out = Vec::new();
            push_int(&mut out, v);
            assert_eq!(String::from_utf8(out).unwrap(), v.to_string());
        }
        let mut out = Vec::new();
        push_padded(&mut out, 5, 2);
        push_padded(&mut out, 0, 6);
        push_padded(&mut out, 12345, 4);
        assert_eq!(String::from_utf8(out).unwrap(), "0500000012345");
    }
}
