//! Upcaster steps declared in `upcasters.toml`: each turns one message version into the next.
//!
//! ```toml
//! [[step]]
//! from = "sales.v1.OrderPaid"
//! to = "sales.v2.OrderPaid"
//! # Fields of `to` whose name and type are the same in `from` are copied. `set` gives the others
//! # (or overrides a copy) as CEL over `payload`, the `from` message; a dotted name sets a field of a
//! # nested message (moving a field into one), and a null leaves the field unset.
//! set = { amount_cents = "cents(payload.amount)", customer_id = "required(payload.user_id)",
//!         currency = "'EUR'", "paid_at" = "utc(payload.paid_at)" }
//! ```
//!
//! Everything is checked at start-up: both messages exist, every `set` path names a field of `to`,
//! every expression parses and its type fits its field, and a field of `to` whose namesake in `from`
//! has another type is set (it cannot be copied, and leaving it empty would lose data silently).
//! Chains and cycles are checked by the registry they are added to.

use std::collections::BTreeMap;
use std::path::Path;

use prost_reflect::{
    DescriptorPool, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, Value as PbValue,
};
use serde::Deserialize;
use toml::Spanned;

use super::expr::{Compiled, Input, Scalar, Type};
use super::view::line_of;
use super::{leak, Problems};
use crate::projection::EventMeta;
use crate::upcast::StepError;

/// The file a domain's folder holds its upcaster steps in (optional: a domain whose events never
/// changed has none).
pub const UPCASTERS_FILE: &str = "upcasters.toml";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpcastersFile {
    #[serde(default)]
    step: Vec<StepDecl>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StepDecl {
    from: Spanned<String>,
    to: Spanned<String>,
    #[serde(default)]
    set: BTreeMap<String, Spanned<String>>,
}

/// One step, compiled.
pub struct FileStep {
    pub from: &'static str,
    pub from_descriptor: MessageDescriptor,
    pub to: &'static str,
    to_descriptor: MessageDescriptor,
    /// `(from's field, to's field)`, copied as they are.
    copies: Vec<(FieldDescriptor, FieldDescriptor)>,
    sets: Vec<StepSet>,
    /// `upcasters.toml:12`, for errors.
    at: String,
}

/// One `set` of a step, compiled.
struct StepSet {
    /// The fields from `to` down to the one set.
    path: Vec<FieldDescriptor>,
    /// That field's kind, looked up once (prost-reflect finds it in the pool at each call).
    kind: Kind,
    expr: Compiled,
    /// `(from's field, required)` when the expression is only that field, moved rather than
    /// evaluated and converted (see [`mark_moves`]).
    moved_from: Option<(FieldDescriptor, bool)>,
}

/// Read the domain's steps; a missing file is no steps. Also the hash of the file's declaration
/// (see [`super::view::declaration_hash`]), empty without a file.
pub fn load(dir: &Path, pool: &DescriptorPool, problems: &mut Problems) -> (Vec<FileStep>, String) {
    let path = dir.join(UPCASTERS_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (Vec::new(), String::new()),
        Err(e) => {
            problems.add(UPCASTERS_FILE, None, format!("cannot read: {e}"));
            return (Vec::new(), String::new());
        }
    };
    let file: UpcastersFile = match toml::from_str(&text) {
        Ok(f) => f,
        Err(e) => {
            let line = e.span().map(|s| line_of(&text, s.start));
            problems.add(UPCASTERS_FILE, line, e.message().to_string());
            return (Vec::new(), String::new());
        }
    };
    // It parsed just above, so hashing it cannot fail.
    let declaration_hash = super::view::declaration_hash(&text).unwrap_or_default();
    let mut steps = Vec::new();
    for decl in &file.step {
        let line = |offset: usize| Some(line_of(&text, offset));
        let message = |name: &Spanned<String>, problems: &mut Problems| {
            let found = pool.get_message_by_name(name.get_ref());
            if found.is_none() {
                problems.add(
                    UPCASTERS_FILE,
                    line(name.span().start),
                    format!("{} is not a message of the schemas", name.get_ref()),
                );
            }
            found
        };
        let (Some(from), Some(to)) = (message(&decl.from, problems), message(&decl.to, problems))
        else {
            continue;
        };
        let step_line = line(decl.from.span().start);
        let label = format!("step {} -> {}", from.full_name(), to.full_name());
        let mut sets = Vec::new();
        for (path, source) in &decl.set {
            let at = line(source.span().start);
            let Some(fields) = field_path(&to, path) else {
                problems.add(
                    UPCASTERS_FILE,
                    at,
                    format!("{label}: set.{path}: {} has no such field", to.full_name()),
                );
                continue;
            };
            let Some(target) = fields.last() else {
                continue;
            };
            let target_type = match super::expr::field_type(target) {
                Ok(t) => t,
                Err(e) => {
                    problems.add(UPCASTERS_FILE, at, format!("{label}: set.{path}: {e}"));
                    continue;
                }
            };
            match Compiled::for_step(source.get_ref(), &from) {
                Ok(expr) if assignable(expr.ty(), &target_type) => sets.push(StepSet {
                    kind: target.kind(),
                    path: fields,
                    expr,
                    moved_from: None,
                }),
                Ok(c) => problems.add(
                    UPCASTERS_FILE,
                    at,
                    format!(
                        "{label}: set.{path} = {:?}: the expression is a {} and the field is a {target_type}",
                        source.get_ref(),
                        c.ty()
                    ),
                ),
                Err(e) => problems.add(
                    UPCASTERS_FILE,
                    at,
                    format!("{label}: set.{path} = {:?}: {e}", source.get_ref()),
                ),
            }
        }
        let set_roots: Vec<&str> = decl
            .set
            .keys()
            .map(|p| p.split('.').next().unwrap_or(p))
            .collect();
        let mut copies = Vec::new();
        for field in to.fields() {
            if set_roots.contains(&field.name()) {
                continue;
            }
            let Some(namesake) = from.get_field_by_name(field.name()) else {
                continue;
            };
            let same = namesake.kind() == field.kind()
                && namesake.is_list() == field.is_list()
                && namesake.is_map() == field.is_map();
            if same {
                copies.push((namesake, field));
            } else {
                problems.add(
                    UPCASTERS_FILE,
                    step_line,
                    format!(
                        "{label}: field {} changes type ({:?} to {:?}) and cannot be copied: say how to convert it, set = {{ {} = \"...\" }}",
                        field.name(),
                        namesake.kind(),
                        field.kind(),
                        field.name()
                    ),
                );
            }
        }
        mark_moves(&mut sets, &copies);
        steps.push(FileStep {
            from: leak(from.full_name()),
            from_descriptor: from,
            to: leak(to.full_name()),
            to_descriptor: to,
            copies,
            sets,
            at: format!("{UPCASTERS_FILE}:{}", step_line.unwrap_or(0)),
        });
    }
    (steps, declaration_hash)
}

/// Mark the sets of a step that can move a field of `from` instead of evaluating: `payload.f` or
/// `required(payload.f)` into a top-level field of the same type, where no other set or copy reads
/// `f` (it is taken out of the message) and no expression reads the whole payload.
fn mark_moves(sets: &mut [StepSet], copies: &[(FieldDescriptor, FieldDescriptor)]) {
    let mut reads: Vec<u32> = copies.iter().map(|(from, _)| from.number()).collect();
    for set in sets.iter() {
        reads.extend(set.expr.payload_fields_read());
    }
    if reads.contains(&super::expr::WHOLE_PAYLOAD) {
        return;
    }
    for set in sets.iter_mut() {
        let ([target], Some((from, required))) = (set.path.as_slice(), set.expr.payload_field())
        else {
            continue;
        };
        let same_type = from.kind() == set.kind
            && from.is_list() == target.is_list()
            && from.is_map() == target.is_map();
        let read_once = reads.iter().filter(|n| **n == from.number()).count() == 1;
        if same_type && read_once {
            set.moved_from = Some((from.clone(), required));
        }
    }
}

/// `a.b.c` as the fields from `message` down.
fn field_path(message: &MessageDescriptor, path: &str) -> Option<Vec<FieldDescriptor>> {
    let mut fields = Vec::new();
    let mut current = message.clone();
    let parts: Vec<&str> = path.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let field = current.get_field_by_name(part)?;
        if i + 1 < parts.len() {
            match field.kind() {
                Kind::Message(m) if !field.is_list() && !field.is_map() => current = m,
                _ => return None,
            }
        }
        fields.push(field);
    }
    Some(fields)
}

/// Whether a value of `from` can be written into a field of type `to`.
fn assignable(from: &Type, to: &Type) -> bool {
    from == to || *from == Type::Null || (*from == Type::Int && *to == Type::UInt)
}

impl FileStep {
    /// Turn one `from` message into its `to` version. The `set` expressions read `input` first;
    /// then the copied fields are moved out of it rather than cloned (the input is not used again).
    pub fn apply(&self, mut input: DynamicMessage) -> Result<DynamicMessage, StepError> {
        let mut set_values: smallvec::SmallVec<[(usize, PbValue); 8]> = smallvec::SmallVec::new();
        {
            let meta = EventMeta::default();
            let scope = Input {
                payload: &input,
                meta: &meta,
            };
            for (i, set) in self.sets.iter().enumerate() {
                if set.moved_from.is_some() {
                    continue;
                }
                let value = set.expr.eval(&scope).map_err(|e| self.failed(i, &e))?;
                if let Some(value) = field_value(value, &set.kind) {
                    set_values.push((i, value.map_err(|e| self.failed(i, &e))?));
                }
            }
        }
        let mut out = DynamicMessage::new(self.to_descriptor.clone());
        for (from, to) in &self.copies {
            if let Some(value) = input.take_field(from) {
                out.try_set_field(to, value).map_err(|e| {
                    StepError::new(format!(
                        "{} ({}): copying {}: {e}",
                        self.at,
                        self.to,
                        to.name()
                    ))
                })?;
            }
        }
        for (i, set) in self.sets.iter().enumerate() {
            let Some((from, required)) = &set.moved_from else {
                continue;
            };
            let value = input.take_field(from);
            let empty = match &value {
                Some(PbValue::String(s)) => s.is_empty(),
                None => matches!(from.kind(), Kind::String),
                Some(_) => false,
            };
            if *required && empty {
                return Err(self.failed(i, &super::expr::REQUIRED_BUT_EMPTY));
            }
            if let Some(value) = value {
                set_values.push((i, value));
            }
        }
        for (i, value) in set_values {
            let path = &self.sets[i].path;
            let mut target = &mut out;
            for field in &path[..path.len().saturating_sub(1)] {
                match target.get_field_mut(field) {
                    PbValue::Message(m) => target = m,
                    _ => return Err(self.failed(i, &"not a message")),
                }
            }
            if let Some(field) = path.last() {
                target
                    .try_set_field(field, value)
                    .map_err(|e| self.failed(i, &e))?;
            }
        }
        Ok(out)
    }

    /// Set `i` of this step failed on an event, for `reason`.
    fn failed(&self, i: usize, reason: &dyn std::fmt::Display) -> StepError {
        let set = &self.sets[i];
        let shown: Vec<&str> = set.path.iter().map(|f| f.name()).collect();
        StepError::new(format!(
            "{}: set.{} = {:?}: {reason}",
            self.at,
            shown.join("."),
            set.expr.source()
        ))
    }
}

/// A computed value as a Protobuf field of `kind`; `None` for a null (the field stays unset).
fn field_value(value: Scalar<'_>, kind: &Kind) -> Option<Result<PbValue, String>> {
    let out_of_range = |v: &dyn std::fmt::Debug| format!("{v:?} is out of the field's range");
    Some(match (value, kind) {
        (Scalar::Null, _) => return None,
        (Scalar::Bool(b), Kind::Bool) => Ok(PbValue::Bool(b)),
        (Scalar::Int(i), Kind::Int32 | Kind::Sint32 | Kind::Sfixed32) => i32::try_from(i)
            .map(PbValue::I32)
            .map_err(|_| out_of_range(&i)),
        (Scalar::Int(i), Kind::Enum(_)) => i32::try_from(i)
            .map(PbValue::EnumNumber)
            .map_err(|_| out_of_range(&i)),
        (Scalar::Int(i), Kind::Int64 | Kind::Sint64 | Kind::Sfixed64) => Ok(PbValue::I64(i)),
        (Scalar::Int(i), Kind::Uint32 | Kind::Fixed32) => u32::try_from(i)
            .map(PbValue::U32)
            .map_err(|_| out_of_range(&i)),
        (Scalar::Int(i), Kind::Uint64 | Kind::Fixed64) => u64::try_from(i)
            .map(PbValue::U64)
            .map_err(|_| out_of_range(&i)),
        (Scalar::UInt(u), Kind::Uint32 | Kind::Fixed32) => u32::try_from(u)
            .map(PbValue::U32)
            .map_err(|_| out_of_range(&u)),
        (Scalar::UInt(u), Kind::Uint64 | Kind::Fixed64) => Ok(PbValue::U64(u)),
        (Scalar::Double(d), Kind::Double) => Ok(PbValue::F64(d)),
        (Scalar::Double(d), Kind::Float) => Ok(PbValue::F32(d as f32)),
        (Scalar::Str(s), Kind::String) => Ok(PbValue::String(s.into_owned())),
        (Scalar::Bytes(b), Kind::Bytes) => {
            Ok(PbValue::Bytes(prost::bytes::Bytes::from(b.into_owned())))
        }
        (Scalar::Timestamp(micros), Kind::Message(m)) => {
            let mut ts = DynamicMessage::new(m.clone());
            let seconds = micros.div_euclid(1_000_000);
            let nanos = (micros.rem_euclid(1_000_000) * 1_000) as i32;
            let set = ts
                .try_set_field_by_number(1, PbValue::I64(seconds))
                .and_then(|()| ts.try_set_field_by_number(2, PbValue::I32(nanos)));
            set.map(|()| PbValue::Message(ts))
                .map_err(|e| e.to_string())
        }
        (Scalar::Message(Some(m)), Kind::Message(_)) => Ok(PbValue::Message(m.clone())),
        (Scalar::Message(None), Kind::Message(_)) => return None,
        (other, kind) => Err(format!("{other:?} cannot be stored in a {kind:?} field")),
    })
}

#[cfg(test)]
mod tests {
    use prost_reflect::{DynamicMessage, Value as PbValue};

    use crate::domain::files::FileDomain;

    fn text(message: &DynamicMessage, field: &str) -> String {
        match message.get_field_by_name(field).as_deref() {
            Some(PbValue::String(s)) => s.clone(),
            other => panic!("{field}: {other:?}"),
        }
    }

    /// A domain of one event type in two versions, in the temp dir.
    fn two_versions() -> FileDomain {
        let dir = std::env::temp_dir().join(format!("rp-step-moves-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let write = |path: &str, text: &str| {
            let path = dir.join(path);
            std::fs::create_dir_all(path.parent().expect("a folder")).expect("folder");
            std::fs::write(path, text).expect("file");
        };
        write(
            "protos/v1.proto",
            "syntax = \"proto3\"; package sales.v1;\n\
             message Placed { string order_id = 1; string user_id = 2; string note = 3; string channel = 4; }",
        );
        write(
            "protos/v2.proto",
            "syntax = \"proto3\"; package sales.v2;\n\
             enum Channel { CHANNEL_UNKNOWN = 0; WEB = 1; STORE = 2; }\n\
             message Placed { string order_id = 1; string customer_id = 2; string note = 3; Channel channel = 4; string currency = 5; }",
        );
        write(
            "domain.toml",
            "name = \"sales\"\ntopics = [\"sales\"]\nschemas = \"protos\"\nevents = [\"sales.v2.Placed\"]\n",
        );
        write(
            "upcasters.toml",
            "[[step]]\nfrom = \"sales.v1.Placed\"\nto = \"sales.v2.Placed\"\n\
             set = { order_id = \"required(payload.order_id)\", customer_id = \"required(payload.user_id)\", currency = \"'EUR'\", channel = \"enum('sales.v2.Channel', payload.channel.upperAscii())\" }\n",
        );
        write(
            "views/per_customer/v1.toml",
            "[[tables]]\nname = \"per_customer\"\nkey = [\"customer_id\"]\n\
             columns = [{ name = \"customer_id\", type = \"text\" }, { name = \"orders\", type = \"bigint\", counter = true }]\n\
             [[on]]\nevents = [\"sales.v2.Placed\"]\nkey = [\"payload.customer_id\"]\nadd = { orders = \"1\" }\n",
        );
        let domain = FileDomain::load(&dir).expect("the domain loads");
        let _ = std::fs::remove_dir_all(&dir);
        domain
    }

    #[test]
    fn a_step_moves_fields_it_only_renames_turns_text_into_an_enum_and_refuses_an_empty_required_one(
    ) {
        let domain = two_versions();
        let step = &domain.steps[0];
        let mut moved: Vec<&str> = step
            .sets
            .iter()
            .filter(|set| set.moved_from.is_some())
            .map(|set| set.path[0].name())
            .collect();
        moved.sort();
        assert_eq!(moved, ["customer_id", "order_id"]);

        let v1 = |user: &str| {
            let mut m = DynamicMessage::new(step.from_descriptor.clone());
            for (field, value) in [
                ("order_id", "o-1"),
                ("user_id", user),
                ("note", "gift"),
                ("channel", "store"),
            ] {
                m.set_field_by_name(field, PbValue::String(value.into()));
            }
            m
        };
        let v2 = step.apply(v1("u-7")).expect("a whole v1 event upcasts");
        assert_eq!(text(&v2, "order_id"), "o-1");
        assert_eq!(text(&v2, "customer_id"), "u-7");
        assert_eq!(text(&v2, "currency"), "EUR");
        assert_eq!(text(&v2, "note"), "gift", "copied");
        assert_eq!(
            v2.get_field_by_name("channel").as_deref(),
            Some(&PbValue::EnumNumber(2)),
            "text to enum"
        );

        let refused = step.apply(v1("")).expect_err("an empty user_id is refused");
        let said = refused.to_string();
        assert!(
            said.contains("set.customer_id = \"required(payload.user_id)\"")
                && said.contains("a required value is empty"),
            "{said}"
        );
    }
}
