//! A view version declared in a file (`views/<name>/v<N>.toml`): its tables and, per event type,
//! the changes an event makes, as CEL expressions. Compiled once at start-up into a [`Projection`]
//! over [`FileEvent`]s; the table SQL is derived from the declaration, every identifier quoted.
//!
//! ```toml
//! [[tables]]
//! name = "order_summary"
//! per_aggregate = true            # each row comes from one aggregate (one partition)
//! key = ["order_id"]
//! bucket = "placed_at"            # optional: verification's buckets
//! indexes = [["customer_id"]]     # optional secondary indexes
//! columns = [
//!   { name = "order_id", type = "text" },
//!   { name = "item_count", type = "bigint", counter = true },   # NOT NULL, starts at 0
//! ]
//!
//! [[on]]
//! events = ["sales.v2.ItemAdded"]  # latest message names, or "*" for every event type
//! key = ["payload.order_id"]      # one expression per key column
//! when = "payload.quantity > 0"   # optional condition
//! add = { item_count = "payload.quantity" }
//! set = { status = "'open'" }     # also min, max, and delete = true
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use prost_reflect::ReflectMessage;
use serde::Deserialize;
use toml::Spanned;

use super::expr::{Compiled, Input};
use super::{leak, FileEvent, Problems};
use crate::projection::{
    Changes, Column, ColumnType, Event, Key, Projection, SchemaSql, TableSpec, Value,
};

/// PostgreSQL truncates identifiers to 63 bytes; a longer name would silently collide.
const MAX_NAME: usize = 63;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ViewFile {
    /// For the reader of the file; declared so that a misspelt key is still refused.
    #[serde(default)]
    #[allow(dead_code)]
    description: Option<String>,
    tables: Vec<TableDecl>,
    #[serde(default)]
    on: Vec<HandlerDecl>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TableDecl {
    name: Spanned<String>,
    #[serde(default)]
    per_aggregate: bool,
    key: Spanned<Vec<String>>,
    #[serde(default)]
    bucket: Option<Spanned<String>>,
    #[serde(default)]
    indexes: Vec<Spanned<Vec<String>>>,
    columns: Vec<Spanned<ColumnDecl>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ColumnDecl {
    name: String,
    #[serde(rename = "type")]
    ty: String,
    #[serde(default)]
    counter: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HandlerDecl {
    events: Spanned<Vec<String>>,
    #[serde(default)]
    table: Option<Spanned<String>>,
    key: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    when: Option<Spanned<String>>,
    #[serde(default)]
    set: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    add: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    min: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    max: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    delete: bool,
}

/// One event type's changes to one table, compiled.
struct Handler {
    table: usize,
    /// Where it is declared, for errors: `views/x/v1.toml:12`.
    at: String,
    key: Vec<(Compiled, ColumnType)>,
    when: Option<Compiled>,
    set: Vec<(usize, Compiled, ColumnType)>,
    add: Vec<(usize, Compiled, ColumnType)>,
    min: Vec<(usize, Compiled, ColumnType)>,
    max: Vec<(usize, Compiled, ColumnType)>,
    delete: bool,
}

/// A view version read from its file.
pub struct FileView {
    name: &'static str,
    version: u32,
    tables: Vec<TableSpec>,
    /// Per event type (by [`FileEvent::kind`]), the handlers it runs, in file order.
    handlers: Vec<Vec<Handler>>,
    /// The event types' names, by kind (what [`Projection::handles`] is asked about).
    kinds: Vec<&'static str>,
    sql: SchemaSql,
    /// The file as users name it, and the hash of its declaration (see [`declaration_hash`]).
    source: String,
    hash: String,
}

/// SHA-256 (hex) of a view file's declaration: the parsed TOML without its `description`, so that
/// comments, layout and the description can change under a version and nothing else can.
pub fn declaration_hash(text: &str) -> Result<String, String> {
    use sha2::Digest;
    let mut value: toml::Table = toml::from_str(text).map_err(|e| e.message().to_string())?;
    value.remove("description");
    // Written back, a parsed table has one form: no comments, no layout.
    let canonical = toml::to_string(&value).map_err(|e| e.to_string())?;
    let digest = sha2::Sha256::digest(canonical.as_bytes());
    Ok(digest.iter().map(|b| format!("{b:02x}")).collect())
}

/// Lowercase letters, digits and `_`, starting with a letter, at most 63 bytes: a name that needs no
/// quoting (it is quoted anyway) and cannot smuggle SQL.
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= MAX_NAME
}

/// Compile one expression of a handler against the event type it runs for, checking it fits its
/// column; a problem names the file, line, expression and event type.
fn compile_expr(
    problems: &mut Problems,
    shown: &str,
    text: &str,
    payload: &prost_reflect::MessageDescriptor,
    what: &str,
    source: &Spanned<String>,
    column: Option<ColumnType>,
) -> Option<Compiled> {
    let line = Some(line_of(text, source.span().start));
    let context = |m: String| {
        format!(
            "{what} = {:?}, for {}: {m}",
            source.get_ref(),
            payload.full_name()
        )
    };
    match Compiled::new(source.get_ref(), payload) {
        Ok(c) => {
            if let Some(column) = column {
                if !c.ty().fits(column) {
                    problems.add(
                        shown,
                        line,
                        context(format!(
                            "the expression is a {} and the column is {}",
                            c.ty(),
                            column.pg_name()
                        )),
                    );
                    return None;
                }
            }
            Some(c)
        }
        Err(e) => {
            problems.add(shown, line, context(e.to_string()));
            None
        }
    }
}

fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn column_type(name: &str) -> Option<ColumnType> {
    Some(match name {
        "bigint" | "int8" => ColumnType::BigInt,
        "integer" | "int" | "int4" => ColumnType::Integer,
        "text" => ColumnType::Text,
        "timestamptz" | "timestamp" => ColumnType::Timestamp,
        "date" => ColumnType::Date,
        "boolean" | "bool" => ColumnType::Bool,
        "bytea" => ColumnType::Bytea,
        "double" | "double precision" | "float8" => ColumnType::Double,
        "numeric" => ColumnType::Numeric,
        "uuid" => ColumnType::Uuid,
        "jsonb" => ColumnType::Jsonb,
        _ => return None,
    })
}

/// The 1-based line of a byte offset.
pub fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map_or(1, |t| t.matches('\n').count() + 1)
}

impl FileView {
    /// Read and compile `path`, the file of view `name` at `version`, against the domain's event
    /// types (`events[kind]` is the descriptor of events of that kind). Every problem found is added
    /// to `problems`; `None` when there was any.
    pub fn load(
        path: &Path,
        shown: &str,
        name: &str,
        version: u32,
        events: &[prost_reflect::MessageDescriptor],
        problems: &mut Problems,
    ) -> Option<FileView> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                problems.add(shown, None, format!("cannot read the view file: {e}"));
                return None;
            }
        };
        let before = problems.len();
        if !valid_name(name) {
            problems.add(
                shown,
                None,
                format!("the view name {name:?} (its folder) is not a valid name: lowercase letters, digits and _, starting with a letter, at most {MAX_NAME} bytes"),
            );
        }
        let file: ViewFile = match toml::from_str(&text) {
            Ok(f) => f,
            Err(e) => {
                let line = e.span().map(|s| line_of(&text, s.start));
                problems.add(shown, line, e.message().to_string());
                return None;
            }
        };
        let at = |offset: usize| format!("{shown}:{}", line_of(&text, offset));
        let line = |offset: usize| Some(line_of(&text, offset));

        let mut tables: Vec<TableSpec> = Vec::new();
        let mut indexes: Vec<Vec<Vec<String>>> = Vec::new();
        for decl in &file.tables {
            let table_name = decl.name.get_ref();
            if !valid_name(table_name) {
                problems.add(shown, line(decl.name.span().start), format!("table name {table_name:?} is not a valid name: lowercase letters, digits and _, starting with a letter, at most {MAX_NAME} bytes"));
            }
            if tables.iter().any(|t| t.name == table_name) {
                problems.add(
                    shown,
                    line(decl.name.span().start),
                    format!("table {table_name} is declared twice"),
                );
            }
            let mut columns: Vec<Column> = Vec::new();
            for column in &decl.columns {
                let c = column.get_ref();
                let l = line(column.span().start);
                if !valid_name(&c.name) {
                    problems.add(shown, l, format!("table {table_name}: column name {:?} is not a valid name: lowercase letters, digits and _, starting with a letter, at most {MAX_NAME} bytes", c.name));
                }
                if columns.iter().any(|x| x.name == c.name) {
                    problems.add(
                        shown,
                        l,
                        format!("table {table_name}: column {} is declared twice", c.name),
                    );
                }
                let Some(ty) = column_type(&c.ty) else {
                    problems.add(shown, l, format!("table {table_name}: column {} has the unknown type {:?} (bigint, integer, text, timestamptz, date, boolean, bytea, double precision, numeric, uuid, jsonb)", c.name, c.ty));
                    continue;
                };
                let mut spec = Column::new(leak(&c.name), ty);
                if c.counter {
                    if !ty.can_be_summed() {
                        problems.add(shown, l, format!("table {table_name}: column {} is a counter but {} cannot be summed (bigint, integer and numeric can)", c.name, ty.pg_name()));
                    }
                    spec.default = match ty {
                        ColumnType::Integer => Value::Integer(0),
                        ColumnType::Numeric => Value::Numeric(crate::projection::Decimal::ZERO),
                        _ => Value::BigInt(0),
                    };
                }
                columns.push(spec);
            }
            // The key columns come first, in key order, as the engine expects.
            let key = decl.key.get_ref();
            let mut ordered = Vec::with_capacity(columns.len());
            for k in key {
                match columns.iter().position(|c| c.name == k) {
                    Some(i) => ordered.push(columns[i].clone()),
                    None => problems.add(
                        shown,
                        line(decl.key.span().start),
                        format!("table {table_name}: key column {k} is not among its columns"),
                    ),
                }
            }
            ordered.extend(
                columns
                    .iter()
                    .filter(|c| !key.iter().any(|k| k == c.name))
                    .cloned(),
            );
            let bucket = decl.bucket.as_ref().and_then(|b| {
                let found = ordered
                    .iter()
                    .find(|c| c.name == b.get_ref())
                    .map(|c| c.name);
                if found.is_none() {
                    problems.add(
                        shown,
                        line(b.span().start),
                        format!(
                            "table {table_name}: bucket column {} is not among its columns",
                            b.get_ref()
                        ),
                    );
                }
                found
            });
            for index in &decl.indexes {
                for c in index.get_ref() {
                    if !ordered.iter().any(|x| x.name == c) {
                        problems.add(
                            shown,
                            line(index.span().start),
                            format!(
                                "table {table_name}: index column {c} is not among its columns"
                            ),
                        );
                    }
                }
            }
            let spec = TableSpec {
                name: leak(table_name),
                columns: ordered,
                key_len: key.len(),
                bucket_column: bucket,
                per_aggregate: decl.per_aggregate,
            };
            if let Err(e) = spec.check() {
                problems.add(shown, line(decl.name.span().start), e);
            }
            indexes.push(decl.indexes.iter().map(|i| i.get_ref().clone()).collect());
            tables.push(spec);
        }
        if tables.is_empty() {
            problems.add(
                shown,
                None,
                "a view declares at least one table ([[tables]])",
            );
        }

        let mut handlers: Vec<Vec<Handler>> = (0..events.len()).map(|_| Vec::new()).collect();
        for decl in &file.on {
            let decl_at = at(decl.events.span().start);
            let table = match (&decl.table, tables.len()) {
                (None, 1) => 0,
                (None, _) => {
                    problems.add(shown, line(decl.events.span().start), "this handler names no table, and the view has several: add table = \"...\"");
                    continue;
                }
                (Some(t), _) => match tables.iter().position(|x| x.name == t.get_ref()) {
                    Some(i) => i,
                    None => {
                        problems.add(
                            shown,
                            line(t.span().start),
                            format!("table {} is not declared in this view", t.get_ref()),
                        );
                        continue;
                    }
                },
            };
            let spec = &tables[table];
            let mut kinds = Vec::new();
            for wanted in decl.events.get_ref() {
                if wanted == "*" {
                    kinds.extend(0..events.len());
                    continue;
                }
                match events.iter().position(|e| e.full_name() == wanted) {
                    Some(k) => kinds.push(k),
                    None => problems.add(
                        shown,
                        line(decl.events.span().start),
                        format!(
                            "{wanted} is not an event type of this domain (its events: {})",
                            events
                                .iter()
                                .map(|e| e.full_name())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ),
                }
            }
            if decl.key.get_ref().len() != spec.key_len {
                problems.add(
                    shown,
                    line(decl.key.span().start),
                    format!(
                        "table {} has {} key column(s); this handler's key gives {}",
                        spec.name,
                        spec.key_len,
                        decl.key.get_ref().len()
                    ),
                );
                continue;
            }
            for kind in kinds {
                let payload = &events[kind];
                let compile = |what: &str,
                               source: &Spanned<String>,
                               column: Option<ColumnType>,
                               problems: &mut Problems| {
                    compile_expr(problems, shown, &text, payload, what, source, column)
                };
                let key: Vec<_> = decl
                    .key
                    .get_ref()
                    .iter()
                    .zip(spec.key_columns())
                    .filter_map(|(source, column)| {
                        compile(
                            &format!("key {}", column.name),
                            source,
                            Some(column.ty),
                            problems,
                        )
                        .map(|c| (c, column.ty))
                    })
                    .collect();
                let when = decl.when.as_ref().and_then(|w| {
                    let c = compile("when", w, None, problems)?;
                    if *c.ty() != super::expr::Type::Bool {
                        problems.add(
                            shown,
                            line(w.span().start),
                            format!(
                                "when = {:?}, for {}: a condition must be a bool, this is a {}",
                                w.get_ref(),
                                payload.full_name(),
                                c.ty()
                            ),
                        );
                        return None;
                    }
                    Some(c)
                });
                let columns = |kind: &str,
                               map: &BTreeMap<String, Spanned<String>>,
                               problems: &mut Problems| {
                    let mut out = Vec::new();
                    for (column, source) in map {
                        let Some(index) = spec.column_index(column) else {
                            problems.add(
                                shown,
                                line(source.span().start),
                                format!("{kind}: table {} has no column {column}", spec.name),
                            );
                            continue;
                        };
                        if index < spec.key_len {
                            problems.add(shown, line(source.span().start), format!("{kind}: {column} is a key column of {}; the key comes from key = [...]", spec.name));
                            continue;
                        }
                        let ty = spec.columns[index].ty;
                        if kind == "add" && !ty.can_be_summed() {
                            problems.add(
                                shown,
                                line(source.span().start),
                                format!(
                                    "add: column {column} of {} is {}, which cannot be summed",
                                    spec.name,
                                    ty.pg_name()
                                ),
                            );
                            continue;
                        }
                        out.push((index, source.clone(), ty));
                    }
                    out
                };
                let set_sources = columns("set", &decl.set, problems);
                let add_sources = columns("add", &decl.add, problems);
                let min_sources = columns("min", &decl.min, problems);
                let max_sources = columns("max", &decl.max, problems);
                let compiled = |kind: &str,
                                sources: Vec<(usize, Spanned<String>, ColumnType)>,
                                problems: &mut Problems|
                 -> Vec<(usize, Compiled, ColumnType)> {
                    sources
                        .into_iter()
                        .filter_map(|(i, s, ty)| {
                            compile(
                                &format!("{kind}.{}", spec.columns[i].name),
                                &s,
                                Some(ty),
                                problems,
                            )
                            .map(|c| (i, c, ty))
                        })
                        .collect()
                };
                let handler = Handler {
                    table,
                    at: decl_at.clone(),
                    key,
                    when,
                    set: compiled("set", set_sources, problems),
                    add: compiled("add", add_sources, problems),
                    min: compiled("min", min_sources, problems),
                    max: compiled("max", max_sources, problems),
                    delete: decl.delete,
                };
                handlers[kind].push(handler);
            }
        }
        if problems.len() > before {
            return None;
        }
        let sql = derive_sql(name, version, &tables, &indexes);
        let hash = match declaration_hash(&text) {
            Ok(hash) => hash,
            Err(e) => {
                problems.add(shown, None, e);
                return None;
            }
        };
        Some(FileView {
            name: leak(name),
            version,
            tables,
            handlers,
            kinds: events.iter().map(|e| leak(e.full_name())).collect(),
            sql,
            source: shown.to_string(),
            hash,
        })
    }

    /// Where this version is declared and the hash of the declaration.
    pub fn definition(&self, inputs_hash: &str) -> crate::domain::Definition {
        crate::domain::Definition {
            projection: self.name.to_string(),
            version: self.version,
            source: self.source.clone(),
            hash: self.hash.clone(),
            inputs_hash: inputs_hash.to_string(),
        }
    }

    pub fn sql(&self) -> &SchemaSql {
        &self.sql
    }

    /// One handler's changes for one event. Its `set` joins a `set` of the handler before it when
    /// both name the same row and nothing came between (a view often sets columns of one row from
    /// several handlers, such as one for every event and one per type): one change for the fold
    /// to look the row up for instead of several, the same cells at the same logical time.
    fn run(
        &self,
        handler: &Handler,
        input: &Input<'_>,
        pending: &mut Option<PendingSet>,
        out: &mut Changes,
    ) -> Result<(), String> {
        if let Some(when) = &handler.when {
            if !when.holds(input).map_err(|e| format!("when: {e}"))? {
                return Ok(());
            }
        }
        let spec = &self.tables[handler.table];
        let mut key = Key::new();
        for ((expr, ty), column) in handler.key.iter().zip(spec.key_columns()) {
            let value = expr
                .column_value(input, *ty)
                .map_err(|e| format!("key {}: {e}", column.name))?;
            if value == Value::Null {
                return Err(format!("key {} = {:?} is null", column.name, expr.source()));
            }
            key.push(value);
        }
        let value = |(i, expr, ty): &(usize, Compiled, ColumnType)| {
            expr.column_value(input, *ty).map_err(|e| {
                format!(
                    "column {} = {:?}: {e}",
                    spec.columns[*i].name,
                    expr.source()
                )
            })
        };
        let only_set = handler.add.is_empty()
            && handler.min.is_empty()
            && handler.max.is_empty()
            && !handler.delete;
        if !handler.set.is_empty() {
            let mut columns = Vec::with_capacity(handler.set.len());
            for entry in &handler.set {
                columns.push((entry.0, value(entry)?));
            }
            match pending {
                Some(row) if row.table == handler.table && row.key == key => row.join(columns),
                _ => {
                    flush(pending, out);
                    let key = if only_set {
                        std::mem::take(&mut key)
                    } else {
                        key.clone()
                    };
                    *pending = Some(PendingSet {
                        table: handler.table,
                        key,
                        columns,
                    });
                }
            }
        }
        if only_set {
            return Ok(());
        }
        flush(pending, out);
        for entry in &handler.add {
            let delta = value(entry)?;
            if delta != Value::Null {
                out.add_value(handler.table, key.clone(), entry.0, delta);
            }
        }
        for entry in &handler.min {
            let v = value(entry)?;
            if v != Value::Null {
                out.min(handler.table, key.clone(), entry.0, v);
            }
        }
        for entry in &handler.max {
            let v = value(entry)?;
            if v != Value::Null {
                out.max(handler.table, key.clone(), entry.0, v);
            }
        }
        if handler.delete {
            out.delete(handler.table, key);
        }
        Ok(())
    }
}

/// A `set` not yet emitted, which the next handler's `set` of the same row may join.
struct PendingSet {
    table: usize,
    key: Key,
    columns: Vec<(usize, Value)>,
}

impl PendingSet {
    /// The later handler's value wins a column both set, as it would applied after.
    fn join(&mut self, columns: Vec<(usize, Value)>) {
        for (column, value) in columns {
            match self.columns.iter_mut().find(|(c, _)| *c == column) {
                Some(slot) => slot.1 = value,
                None => self.columns.push((column, value)),
            }
        }
    }
}

fn flush(pending: &mut Option<PendingSet>, out: &mut Changes) {
    if let Some(row) = pending.take() {
        out.set(row.table, row.key, row.columns);
    }
}

/// The version's SQL: tables without keys (the engine loads them, then builds keys and indexes).
fn derive_sql(
    view: &str,
    version: u32,
    tables: &[TableSpec],
    indexes: &[Vec<Vec<String>>],
) -> SchemaSql {
    let mut create = format!("-- {view} v{version}, derived from its view file.\n");
    let mut keys = String::new();
    for (spec, indexes) in tables.iter().zip(indexes) {
        let counters_and_keys = |i: usize, c: &Column| i < spec.key_len || c.default != Value::Null;
        let columns: Vec<String> = spec
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                format!(
                    "    {} {}{}",
                    quoted(c.name),
                    c.ty.pg_name(),
                    if counters_and_keys(i, c) {
                        " NOT NULL"
                    } else {
                        ""
                    }
                )
            })
            .collect();
        create.push_str(&format!(
            "CREATE TABLE {} (\n{}\n);\n",
            quoted(spec.name),
            columns.join(",\n")
        ));
        let key: Vec<String> = spec.key_columns().iter().map(|c| quoted(c.name)).collect();
        keys.push_str(&format!(
            "ALTER TABLE {} ADD PRIMARY KEY ({});\n",
            quoted(spec.name),
            key.join(", ")
        ));
        for columns in indexes {
            let mut index_name = format!("{}_{}", spec.name, columns.join("_"));
            index_name.truncate(MAX_NAME);
            let list: Vec<String> = columns.iter().map(|c| quoted(c)).collect();
            keys.push_str(&format!(
                "CREATE INDEX {} ON {} ({});\n",
                quoted(&index_name),
                quoted(spec.name),
                list.join(", ")
            ));
        }
    }
    SchemaSql {
        tables: create,
        indexes: keys,
    }
}

impl Projection<FileEvent> for FileView {
    fn name(&self) -> &'static str {
        self.name
    }

    fn version(&self) -> u32 {
        self.version
    }

    fn tables(&self) -> &[TableSpec] {
        &self.tables
    }

    fn handles(&self, event_type: &str) -> Option<bool> {
        let kind = self.kinds.iter().position(|k| *k == event_type);
        Some(kind.is_some_and(|kind| self.handlers.get(kind).is_some_and(|h| !h.is_empty())))
    }

    fn apply(&self, event: &Event<'_, FileEvent>, out: &mut Changes) {
        let Some(handlers) = self.handlers.get(event.payload.kind) else {
            return;
        };
        let input = Input {
            payload: &event.payload.message,
            meta: event.meta,
        };
        let mut pending = None;
        for handler in handlers {
            if let Err(reason) = self.run(handler, &input, &mut pending, out) {
                out.refuse(format!(
                    "view {} v{} ({}), for {}: {reason}",
                    self.name,
                    self.version,
                    handler.at,
                    event.payload.message.descriptor().full_name()
                ));
                return;
            }
        }
        flush(&mut pending, out);
    }
}

#[cfg(test)]
mod tests {
    use super::declaration_hash;

    const VIEW: &str = r#"[[tables]]
name = "counts"
key = ["id"]
columns = [{ name = "id", type = "text" }, { name = "n", type = "bigint", counter = true }]
"#;

    #[test]
    fn comments_layout_and_description_leave_the_declaration_hash_alone_and_a_value_does_not() {
        let hash = |text: &str| declaration_hash(text).expect("valid TOML");
        let relaid = format!(
            "# counts\ndescription = \"per id\"\n\n{}",
            VIEW.replace(", { name", ",\n  { name")
        );
        assert_eq!(hash(VIEW), hash(&relaid));
        assert_ne!(hash(VIEW), hash(&VIEW.replace("bigint", "integer")));
        assert!(declaration_hash("tables = [").is_err());
    }
}
