//! to_jsonb(row) for the one-row audit path, for rows made of the column
//! types most tables use. to_jsonb prints every number through its output
//! function and parses it back with numeric_in, looks each column's type up
//! on every call, and copies every text: nearly a third of the cost of
//! forming a one-row entry, measured on a row of integers and text. Here a
//! table's columns are classified once (when its audit plan is made) and
//! each value goes into the jsonb as it is. A table with any other column
//! type keeps to_jsonb.
//! The result is the jsonb to_jsonb builds, byte for byte (tests below).

use pgrx::pg_sys;
use pgrx::pg_sys::jbvType::{jbvBinary, jbvBool, jbvNull, jbvNumeric, jbvString};
use pgrx::pg_sys::JsonbIteratorToken::{WJB_BEGIN_OBJECT, WJB_END_OBJECT, WJB_KEY, WJB_VALUE};

/// How a column's value becomes JSON (what to_jsonb's category for its type
/// does with it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    Bool,
    Int2,
    Int4,
    Int8,
    /// A JSON number, or a string for NaN and the infinities.
    Numeric,
    /// text, varchar and char(n): the bytes, as the output function gives them.
    Text,
    Uuid,
    /// date, timestamp, timestamptz: ISO 8601, as to_jsonb writes them.
    DateTime(pg_sys::Oid),
    Jsonb,
}

/// The kinds of a table's columns (None for dropped ones), or None when a
/// column has a type this does not handle.
pub unsafe fn kinds(desc: pg_sys::TupleDesc) -> Option<Vec<Option<Kind>>> {
    (0..(*desc).natts as usize)
        .map(|i| {
            let att = &*(*desc).attrs.as_ptr().add(i);
            if att.attisdropped {
                return Some(None);
            }
            let kind = match att.atttypid {
                pg_sys::BOOLOID => Kind::Bool,
                pg_sys::INT2OID => Kind::Int2,
                pg_sys::INT4OID => Kind::Int4,
                pg_sys::INT8OID => Kind::Int8,
                pg_sys::NUMERICOID => Kind::Numeric,
                pg_sys::TEXTOID | pg_sys::VARCHAROID | pg_sys::BPCHAROID => Kind::Text,
                pg_sys::UUIDOID => Kind::Uuid,
                t @ (pg_sys::DATEOID | pg_sys::TIMESTAMPOID | pg_sys::TIMESTAMPTZOID) => Kind::DateTime(t),
                pg_sys::JSONBOID => Kind::Jsonb,
                _ => return None,
            };
            Some(Some(kind))
        })
        .collect()
}

fn string(bytes: &[u8]) -> pg_sys::JsonbValue {
    let mut v: pg_sys::JsonbValue = unsafe { std::mem::zeroed() };
    v.type_ = jbvString;
    v.val.string = pg_sys::JsonbValue__bindgen_ty_1__bindgen_ty_1 {
        len: bytes.len() as i32,
        val: bytes.as_ptr().cast_mut().cast(),
    };
    v
}

fn numeric(n: pg_sys::Numeric) -> pg_sys::JsonbValue {
    let mut v: pg_sys::JsonbValue = unsafe { std::mem::zeroed() };
    v.type_ = jbvNumeric;
    v.val.numeric = n;
    v
}

/// The row (a composite datum of the table's type) as to_jsonb gives it,
/// its columns classified by kinds().
pub unsafe fn row(row: pg_sys::Datum, desc: pg_sys::TupleDesc, kinds: &[Option<Kind>]) -> pg_sys::Datum {
    let natts = (*desc).natts as usize;
    let header = row.cast_mut_ptr::<pg_sys::HeapTupleHeaderData>();
    let mut tuple: pg_sys::HeapTupleData = std::mem::zeroed();
    tuple.t_len = pgrx::varlena::varsize(header.cast()) as u32;
    tuple.t_data = header;
    let mut values = vec![pg_sys::Datum::from(0); natts];
    let mut nulls = vec![false; natts];
    pg_sys::heap_deform_tuple(&mut tuple, desc, values.as_mut_ptr(), nulls.as_mut_ptr());

    // Bytes the values point into until the jsonb is built (uuids).
    let mut scratch: Vec<Vec<u8>> = Vec::new();
    let mut state: *mut pg_sys::JsonbParseState = std::ptr::null_mut();
    pg_sys::pushJsonbValue(&mut state, WJB_BEGIN_OBJECT, std::ptr::null_mut());
    for i in 0..natts {
        let Some(kind) = kinds[i] else { continue };
        let att = &*(*desc).attrs.as_ptr().add(i);
        let name = std::ffi::CStr::from_ptr(att.attname.data.as_ptr()).to_bytes();
        let mut key = string(name);
        pg_sys::pushJsonbValue(&mut state, WJB_KEY, &mut key);
        let d = values[i];
        let mut v: pg_sys::JsonbValue = std::mem::zeroed();
        if nulls[i] {
            v.type_ = jbvNull;
        } else {
            match kind {
                Kind::Bool => {
                    v.type_ = jbvBool;
                    v.val.boolean = d.value() != 0;
                }
                Kind::Int2 => v = numeric(pg_sys::int64_to_numeric(d.value() as i16 as i64)),
                Kind::Int4 => v = numeric(pg_sys::int64_to_numeric(d.value() as i32 as i64)),
                Kind::Int8 => v = numeric(pg_sys::int64_to_numeric(d.value() as i64)),
                Kind::Numeric => {
                    let n = pg_sys::pg_detoast_datum(d.cast_mut_ptr()).cast::<pg_sys::NumericData>();
                    if pg_sys::numeric_is_nan(n) || pg_sys::numeric_is_inf(n) {
                        let out = crate::audit_direct::call1(pg_sys::numeric_out, pg_sys::Datum::from(n));
                        v = string(std::ffi::CStr::from_ptr(out.cast_mut_ptr()).to_bytes());
                    } else {
                        v = numeric(n);
                    }
                }
                Kind::Text => {
                    let t = pg_sys::pg_detoast_datum_packed(d.cast_mut_ptr());
                    let len = pgrx::varlena::varsize_any_exhdr(t);
                    v = string(std::slice::from_raw_parts(pgrx::varlena::vardata_any(t).cast::<u8>(), len));
                }
                Kind::Uuid => {
                    let bytes = std::slice::from_raw_parts(d.cast_mut_ptr::<u8>(), 16);
                    let mut text = Vec::with_capacity(38);
                    crate::seal::uuid_string(&mut text, bytes);
                    scratch.push(text);
                    let text = scratch.last().expect("just pushed");
                    v = string(&text[1..text.len() - 1]); // without the quotes
                }
                Kind::DateTime(typid) => {
                    let out = pg_sys::JsonEncodeDateTime(std::ptr::null_mut(), d, typid, std::ptr::null());
                    v = string(std::ffi::CStr::from_ptr(out).to_bytes());
                }
                Kind::Jsonb => {
                    // Pushed as a container, which pushJsonbValue unpacks
                    // into the object, as to_jsonb copies a jsonb column.
                    let j = pg_sys::pg_detoast_datum(d.cast_mut_ptr()).cast::<pg_sys::Jsonb>();
                    v.type_ = jbvBinary;
                    v.val.binary = pg_sys::JsonbValue__bindgen_ty_1__bindgen_ty_4 {
                        len: (pgrx::varlena::varsize(j.cast()) - pg_sys::VARHDRSZ) as i32,
                        data: &mut (*j).root,
                    };
                }
            }
        }
        pg_sys::pushJsonbValue(&mut state, WJB_VALUE, &mut v);
    }
    let object = pg_sys::pushJsonbValue(&mut state, WJB_END_OBJECT, std::ptr::null_mut());
    pg_sys::Datum::from(pg_sys::JsonbValueToJsonb(object))
}

/// The value of a key of a jsonb object (a container's comes as jbvBinary),
/// or None when the object lacks it.
unsafe fn field(object: pg_sys::Datum, key: &str) -> Option<pg_sys::JsonbValue> {
    let j = pg_sys::pg_detoast_datum(object.cast_mut_ptr()).cast::<pg_sys::Jsonb>();
    let mut v: pg_sys::JsonbValue = std::mem::zeroed();
    let found = pg_sys::getKeyJsonValueFromContainer(&mut (*j).root, key.as_ptr().cast(), key.len() as i32, &mut v);
    (!found.is_null()).then_some(v)
}

/// The bytes of a jbvString value.
unsafe fn string_bytes(v: &pg_sys::JsonbValue) -> &[u8] {
    std::slice::from_raw_parts(v.val.string.val.cast::<u8>(), v.val.string.len as usize)
}

/// The object of the given keys of a jsonb object and their values (keys it
/// lacks are left out): what jsonb_delete_array(object, every other key)
/// gives, without walking the other keys.
pub unsafe fn pick(object: pg_sys::Datum, keys: &[String]) -> pg_sys::Datum {
    let mut state: *mut pg_sys::JsonbParseState = std::ptr::null_mut();
    pg_sys::pushJsonbValue(&mut state, WJB_BEGIN_OBJECT, std::ptr::null_mut());
    for k in keys {
        let Some(mut v) = field(object, k) else { continue };
        let mut key = string(k.as_bytes());
        pg_sys::pushJsonbValue(&mut state, WJB_KEY, &mut key);
        pg_sys::pushJsonbValue(&mut state, WJB_VALUE, &mut v);
    }
    let object = pg_sys::pushJsonbValue(&mut state, WJB_END_OBJECT, std::ptr::null_mut());
    pg_sys::Datum::from(pg_sys::JsonbValueToJsonb(object))
}

/// The string value of a key of a jsonb object, or None when it lacks the
/// key or its value is not a string.
pub unsafe fn string_field(object: pg_sys::Datum, key: &str) -> Option<Vec<u8>> {
    field(object, key).filter(|v| v.type_ == jbvString).map(|v| string_bytes(&v).to_vec())
}

/// Whether a key has equal values in two jsonb objects, as jsonb's `=` has
/// it (numbers by value, containers by contents; a key both lack is equal):
/// what `IS DISTINCT FROM` on `old -> key` and `new -> key` decides, without
/// making a jsonb of either value.
pub unsafe fn same_field(old: pg_sys::Datum, new: pg_sys::Datum, key: &str) -> bool {
    match (field(old, key), field(new, key)) {
        (None, None) => true,
        (Some(a), Some(b)) if a.type_ == b.type_ => {
            let t = a.type_;
            if t == jbvNull {
                true
            } else if t == jbvBool {
                a.val.boolean == b.val.boolean
            } else if t == jbvString {
                string_bytes(&a) == string_bytes(&b)
            } else if t == jbvNumeric {
                pgrx::direct_function_call::<bool>(
                    pg_sys::numeric_eq,
                    &[Some(pg_sys::Datum::from(a.val.numeric)), Some(pg_sys::Datum::from(b.val.numeric))],
                )
                .unwrap_or(false)
            } else if t == jbvBinary {
                pg_sys::compareJsonbContainers(a.val.binary.data, b.val.binary.data) == 0
            } else {
                false
            }
        }
        _ => false,
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;
    use pgrx::{pg_sys, AnyElement};

    fn bytes(d: pg_sys::Datum) -> Vec<u8> {
        unsafe { pgrx::varlena::varlena_to_byte_slice(pg_sys::pg_detoast_datum(d.cast_mut_ptr())).to_vec() }
    }

    /// Whether our jsonb of the row is to_jsonb's, byte for byte, and our
    /// pick of `keys` is jsonb_delete_array's of every other key.
    #[pg_extern]
    fn row_json_same(row: AnyElement, keys: Vec<String>) -> bool {
        unsafe {
            let desc = pg_sys::lookup_rowtype_tupdesc(row.oid(), -1);
            let kinds = super::kinds(desc).expect("test tables use handled types");
            let ours = super::row(row.datum(), desc, &kinds);
            let theirs = crate::audit_direct::row_jsonb(row.datum(), desc, None);
            let others: Vec<String> = (0..(*desc).natts as usize)
                .map(|i| &*(*desc).attrs.as_ptr().add(i))
                .filter(|a| !a.attisdropped)
                .map(|a| std::ffi::CStr::from_ptr(a.attname.data.as_ptr()).to_string_lossy().into_owned())
                .filter(|n| !keys.contains(n))
                .collect();
            pg_sys::DecrTupleDescRefCount(desc);
            let deleted = pgrx::direct_function_call_as_datum(
                pg_sys::jsonb_delete_array,
                &[Some(theirs), others.into_datum()],
            )
            .unwrap();
            bytes(ours) == bytes(theirs) && bytes(super::pick(theirs, &keys)) == bytes(deleted)
        }
    }

    /// Whether same_field agrees with `IS NOT DISTINCT FROM` on the key's values.
    #[pg_extern]
    fn same_field_agrees(a: pgrx::JsonB, b: pgrx::JsonB, key: &str) -> bool {
        let (a, b) = (a.into_datum().unwrap(), b.into_datum().unwrap());
        let sql = Spi::get_one_with_args::<bool>(
            "SELECT ($1::jsonb -> $3) IS NOT DISTINCT FROM ($2::jsonb -> $3)",
            &[unsafe { pgrx::datum::DatumWithOid::new(a, pg_sys::JSONBOID) }, unsafe { pgrx::datum::DatumWithOid::new(b, pg_sys::JSONBOID) }, key.into()],
        )
        .unwrap()
        .unwrap();
        unsafe { super::same_field(a, b, key) == sql }
    }

    #[pg_test]
    fn changed_columns_are_found_as_is_distinct_from_finds_them() {
        let values = [
            "null", "true", "false", "0", "1", "1.0", "1.00", "-1", "1e3", "1000", "\"\"", "\"a\"", "\"A\"", "\"a \"",
            "\"é\"", "[]", "{}", "[1, 2]", "[1, 2.0]", "[2, 1]", "{\"a\": 1}", "{\"a\": 1.0}", "{\"a\": [null]}", "[[]]",
        ];
        let objects: Vec<String> = values.iter().map(|v| format!("{{\"k\": {v}}}")).chain(["{}".to_string()]).collect();
        let list = objects.iter().map(|o| format!("('{o}'::jsonb)")).collect::<Vec<_>>().join(", ");
        let (pairs, agreeing, differing) = Spi::get_three::<i64, i64, i64>(&format!(
            "WITH v(j) AS (VALUES {list})
             SELECT count(*), count(*) FILTER (WHERE tests.same_field_agrees(a.j, b.j, 'k')),
                    count(*) FILTER (WHERE (a.j -> 'k') IS DISTINCT FROM (b.j -> 'k'))
               FROM v a, v b"
        ))
        .unwrap();
        let n = objects.len() as i64;
        assert_eq!(pairs, Some(n * n));
        assert_eq!(agreeing, Some(n * n), "same_field disagrees with IS DISTINCT FROM");
        assert!(differing.unwrap() > n * (n - 4), "most pairs differ, some only in spelling do not");
    }

    #[pg_test]
    fn rows_come_out_as_to_jsonb_builds_them() {
        Spi::run(
            "SET TimeZone = 'America/St_Johns';
             CREATE TABLE rj (b boolean, s smallint, i int, l bigint, n numeric, t text, v varchar(20), c char(6),
                              u uuid, d date, ts timestamp, tz timestamptz, j jsonb, gone int, \"odd \"\" key\" text);
             ALTER TABLE rj DROP COLUMN gone;
             INSERT INTO rj VALUES
               (true, -32768, -2147483648, -9223372036854775808, 'NaN', '', '', '', '00000000-0000-0000-0000-000000000000',
                '-infinity', 'infinity', '-infinity', 'null', 'x'),
               (false, 32767, 2147483647, 9223372036854775807, 'Infinity', 'é \"q\" \\ ' || chr(1), 'zoë', 'ab',
                'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '2026-02-28', '2026-11-23 10:15:00.123456', '1999-12-31 23:59:59.5+03',
                '[1, \"two\", {\"three\": [true, null]}]', NULL),
               (NULL, NULL, NULL, NULL, '-Infinity', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
               (true, 0, 0, 0, '-0.000', repeat('long text ', 100000), 'v', 'full6c', gen_random_uuid(), '0001-01-01 BC',
                '294276-12-31 23:59:59.999999', now(), '{\"b\": 1, \"a\": {\"nested\": \"é\"}, \"\": []}', '');
             INSERT INTO rj (n, i, l, j) SELECT round((random() - 0.5)::numeric * 10::numeric ^ (g % 60 - 30), g % 40),
                                                 g, g * 1000003, to_jsonb(g) FROM generate_series(1, 500) g;",
        )
        .unwrap();
        let checked = Spi::get_one::<i64>("SELECT count(*) FROM rj WHERE tests.row_json_same(rj, ARRAY['i', 'odd \"\" key'])")
            .unwrap()
            .unwrap();
        let all = Spi::get_one::<i64>("SELECT count(*) FROM rj").unwrap().unwrap();
        assert_eq!((checked, all), (504, 504), "every row as to_jsonb builds it");
        assert_eq!(Spi::get_one::<i64>("SELECT count(*) FROM rj WHERE tests.row_json_same(rj, '{}')").unwrap(), Some(504));
        // A type it does not handle leaves the table to to_jsonb.
        Spi::run("CREATE TABLE rj_other (i int, f float8)").unwrap();
        let handled = unsafe {
            let rel = pg_sys::RelnameGetRelid(c"rj_other".as_ptr());
            let r = pg_sys::RelationIdGetRelation(rel);
            let k = super::kinds((*r).rd_att);
            pg_sys::RelationClose(r);
            k.is_some()
        };
        assert!(!handled);
    }
}
