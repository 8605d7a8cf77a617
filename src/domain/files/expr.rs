//! Expressions in view files: CEL (the Common Expression Language of protovalidate, Envoy and
//! Kubernetes), parsed once at start-up by the `cel` crate's parser and compiled here, against the
//! event's Protobuf descriptor, into a typed tree that is evaluated straight on the decoded message.
//!
//! Why not the `cel` crate's interpreter: it evaluates over its own values, so every event would be
//! converted into a CEL map (a `String` per field read, a map per message) before one column is
//! computed; and it finds a misspelt field or a type mismatch only when an event reaches it. Compiling
//! against the descriptors finds both in `check`, before anything is read, and reads each field in
//! place.
//!
//! What an expression sees: `payload`, the event at its latest version (its fields by their Protobuf
//! names; `google.protobuf.Timestamp` fields as timestamps, NULL when unset; enums as their numbers),
//! and `event`, where it sits in the log: `event.time` (its logical time, a timestamp),
//! `event.partition`, `event.offset`, `event.sequence`, `event.aggregate_id`, `event.aggregate_type`,
//! `event.type` (the message's full name). There is no clock to read: the same log gives the same
//! values. Supported: literals (including `null`), `+ - * / %` (integers checked for overflow), `==
//! != < <= > >=`, `&& || !`, `c ? a : b`, `has(payload.field)`, and the functions `int`, `uint`,
//! `double`, `string`, `date` (the UTC day of a timestamp), `timestamp` (RFC 3339 text), `size`, and
//! the methods `contains`, `startsWith`, `endsWith`, `lowerAscii`, `upperAscii`, `trim`,
//! `split(sep)` / `split(sep, n)` (a list of strings, indexed with `[i]`). For real histories:
//! `cents("12.50")` (a decimal amount as integer cents, exactly), `utc("2024-03-31 02:30:00
//! Europe/Berlin")` or `utc(local, zone)` (a local time and an IANA zone to a UTC timestamp), and
//! `required(x)` (x, or an error for that event when it is empty), `enum('pkg.Status', text)` (the
//! number of the enum value named `text`, an error for that event when it names none).
//! Everything else CEL has (lists, maps, macros over them, struct literals) is refused by `check`
//! with the construct named.

use std::borrow::Cow;
use std::fmt;

use cel::common::ast::{Expr as CelExpr, IdedExpr, LiteralValue};
use prost_reflect::{
    DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, ReflectMessage, Value as PbValue,
};

use crate::projection::{ColumnType, Decimal, Double, EventMeta, Value};

const TIMESTAMP: &str = "google.protobuf.Timestamp";

/// The static type of an expression, known before any event is read.
#[derive(Clone, Debug, PartialEq)]
pub enum Type {
    Null,
    Bool,
    Int,
    UInt,
    Double,
    String,
    Bytes,
    Timestamp,
    Date,
    Message(MessageDescriptor),
    /// A list of strings, from `split`: indexed with `[i]`, measured with `size`.
    Strings,
}

impl fmt::Display for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Type::Null => f.write_str("null"),
            Type::Bool => f.write_str("bool"),
            Type::Int => f.write_str("int"),
            Type::UInt => f.write_str("uint"),
            Type::Double => f.write_str("double"),
            Type::String => f.write_str("string"),
            Type::Bytes => f.write_str("bytes"),
            Type::Timestamp => f.write_str("timestamp"),
            Type::Date => f.write_str("date"),
            Type::Message(m) => write!(f, "message {}", m.full_name()),
            Type::Strings => f.write_str("list(string)"),
        }
    }
}

impl Type {
    /// Whether a value of this type can be written into a column of `column` type.
    pub fn fits(&self, column: ColumnType) -> bool {
        matches!(
            (self, column),
            (Type::Null, _)
                | (Type::Bool, ColumnType::Bool)
                | (
                    Type::Int | Type::UInt,
                    ColumnType::BigInt
                        | ColumnType::Integer
                        | ColumnType::Numeric
                        | ColumnType::Double
                )
                | (Type::Double, ColumnType::Double)
                | (
                    Type::String,
                    ColumnType::Text | ColumnType::Uuid | ColumnType::Numeric | ColumnType::Jsonb
                )
                | (Type::Bytes, ColumnType::Bytea)
                | (Type::Timestamp, ColumnType::Timestamp)
                | (Type::Date, ColumnType::Date)
        )
    }

    fn numeric(&self) -> bool {
        matches!(self, Type::Int | Type::UInt | Type::Double)
    }
}

/// A value computed for one event. Strings and bytes read from the message are borrowed from it.
#[derive(Clone, Debug, PartialEq)]
pub enum Scalar<'a> {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Double(f64),
    Str(Cow<'a, str>),
    Bytes(Cow<'a, [u8]>),
    /// Microseconds since the Unix epoch, UTC.
    Timestamp(i64),
    /// Days since the Unix epoch.
    Date(i32),
    /// A message; `None` when the field holding it is unset (its fields read as their defaults).
    Message(Option<&'a DynamicMessage>),
    Strings(Vec<String>),
}

/// What an expression is evaluated on.
pub struct Input<'a> {
    pub payload: &'a DynamicMessage,
    pub meta: &'a EventMeta,
}

/// Why an expression could not compute a value for one event (an integer overflow, text that is not
/// a number): the event is refused, a dead letter or the end of the replay as the policy says.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct EvalError(pub String);

/// Why an expression was refused at start-up.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct CompileError(pub String);

fn refuse<T>(message: impl Into<String>) -> Result<T, CompileError> {
    Err(CompileError(message.into()))
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum MetaField {
    Time,
    Partition,
    Offset,
    Sequence,
    AggregateId,
    AggregateType,
    TypeName,
}

const META_FIELDS: [(&str, MetaField, Type); 7] = [
    ("time", MetaField::Time, Type::Timestamp),
    ("partition", MetaField::Partition, Type::Int),
    ("offset", MetaField::Offset, Type::Int),
    ("sequence", MetaField::Sequence, Type::Int),
    ("aggregate_id", MetaField::AggregateId, Type::String),
    ("aggregate_type", MetaField::AggregateType, Type::String),
    ("type", MetaField::TypeName, Type::String),
];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Arith {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Compare {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Function {
    Int,
    UInt,
    Double,
    String,
    Date,
    Timestamp,
    Size,
    Contains,
    StartsWith,
    EndsWith,
    Lower,
    Upper,
    Trim,
    Split,
    Index,
    Cents,
    Utc,
    Required,
}

#[derive(Clone, Debug)]
enum Node {
    Const(Scalar<'static>),
    Payload,
    Meta(MetaField),
    Field {
        of: Box<Node>,
        field: FieldDescriptor,
        ty: Type,
    },
    Has {
        of: Box<Node>,
        field: FieldDescriptor,
    },
    Not(Box<Node>),
    Negate(Box<Node>),
    Arith(Arith, Box<Node>, Box<Node>),
    Compare(Compare, Box<Node>, Box<Node>),
    And(Box<Node>, Box<Node>),
    Or(Box<Node>, Box<Node>),
    Cond(Box<Node>, Box<Node>, Box<Node>),
    Call(Function, Vec<Node>),
    EnumByName {
        descriptor: prost_reflect::EnumDescriptor,
        text: Box<Node>,
    },
}

/// What `required(x)` says of an empty `x` (an upcaster step that moves a required field says the
/// same).
pub const REQUIRED_BUT_EMPTY: &str = "a required value is empty";

/// In [`Compiled::payload_fields_read`]: the expression takes the whole payload.
pub const WHOLE_PAYLOAD: u32 = u32::MAX;

/// An expression compiled against one message type, ready to evaluate on every event of it.
#[derive(Clone, Debug)]
pub struct Compiled {
    node: Node,
    ty: Type,
    source: String,
}

impl Compiled {
    /// Parse `source` and type it against `payload`, the message the expression will see, and the
    /// event's time and position.
    pub fn new(source: &str, payload: &MessageDescriptor) -> Result<Compiled, CompileError> {
        Compiled::parse(
            source,
            &Scope {
                payload,
                event: true,
            },
        )
    }

    /// Like [`Compiled::new`], for an upcaster step: the message alone, no `event`.
    pub fn for_step(source: &str, payload: &MessageDescriptor) -> Result<Compiled, CompileError> {
        Compiled::parse(
            source,
            &Scope {
                payload,
                event: false,
            },
        )
    }

    fn parse(source: &str, scope: &Scope<'_>) -> Result<Compiled, CompileError> {
        let parsed = cel::parser::Parser::new().parse(source).map_err(|errors| {
            let first = errors
                .errors
                .first()
                .map(|e| format!("column {}: {}", e.pos.1 + 1, e.msg))
                .unwrap_or_else(|| errors.to_string());
            CompileError(format!("does not parse as CEL: {first}"))
        })?;
        let (node, ty) = compile(&parsed, scope)?;
        Ok(Compiled {
            node,
            ty,
            source: source.to_string(),
        })
    }

    pub fn ty(&self) -> &Type {
        &self.ty
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn eval<'a>(&self, input: &Input<'a>) -> Result<Scalar<'a>, EvalError> {
        eval(&self.node, input)
    }

    /// The field of the payload this expression is, when it is only that: `payload.f` or
    /// `required(payload.f)` (then `true`: an empty string is an error). An upcaster step can move
    /// such a value into the next version instead of converting and copying it.
    pub fn payload_field(&self) -> Option<(&FieldDescriptor, bool)> {
        match &self.node {
            Node::Field { of, field, .. } if matches!(**of, Node::Payload) => Some((field, false)),
            Node::Call(Function::Required, args) => match args.as_slice() {
                [Node::Field { of, field, .. }] if matches!(**of, Node::Payload) => {
                    Some((field, true))
                }
                _ => None,
            },
            _ => None,
        }
    }

    /// The numbers of the payload's own fields this expression reads (or tests with `has`);
    /// [`WHOLE_PAYLOAD`] when it takes the payload itself.
    pub fn payload_fields_read(&self) -> Vec<u32> {
        fn walk(node: &Node, out: &mut Vec<u32>) {
            match node {
                Node::Field { of, field, .. } | Node::Has { of, field } => {
                    if matches!(**of, Node::Payload) {
                        out.push(field.number());
                    } else {
                        walk(of, out);
                    }
                }
                Node::Not(a) | Node::Negate(a) => walk(a, out),
                Node::Arith(_, a, b)
                | Node::Compare(_, a, b)
                | Node::And(a, b)
                | Node::Or(a, b) => {
                    walk(a, out);
                    walk(b, out);
                }
                Node::Cond(c, a, b) => {
                    walk(c, out);
                    walk(a, out);
                    walk(b, out);
                }
                Node::Call(_, args) => args.iter().for_each(|a| walk(a, out)),
                Node::EnumByName { text, .. } => walk(text, out),
                Node::Payload => out.push(WHOLE_PAYLOAD),
                Node::Const(_) | Node::Meta(_) => {}
            }
        }
        let mut out = Vec::new();
        walk(&self.node, &mut out);
        out
    }

    /// Evaluate and convert to a column value of type `column` (checked with [`Type::fits`] at
    /// start-up; what only the value can tell, such as a number out of `integer`'s range, is an
    /// error here).
    pub fn column_value(&self, input: &Input<'_>, column: ColumnType) -> Result<Value, EvalError> {
        to_column(self.eval(input)?, column)
    }

    /// Evaluate a condition (typed `bool` at start-up).
    pub fn holds(&self, input: &Input<'_>) -> Result<bool, EvalError> {
        match self.eval(input)? {
            Scalar::Bool(b) => Ok(b),
            other => Err(EvalError(format!("expected a bool, got {other:?}"))),
        }
    }
}

pub(super) fn field_type(field: &FieldDescriptor) -> Result<Type, CompileError> {
    if field.is_list() || field.is_map() {
        return refuse(format!(
            "field {} is {}: repeated and map fields are not supported in expressions yet",
            field.full_name(),
            if field.is_map() { "a map" } else { "repeated" }
        ));
    }
    Ok(match field.kind() {
        Kind::Bool => Type::Bool,
        Kind::Int32
        | Kind::Sint32
        | Kind::Sfixed32
        | Kind::Int64
        | Kind::Sint64
        | Kind::Sfixed64 => Type::Int,
        Kind::Uint32 | Kind::Fixed32 | Kind::Uint64 | Kind::Fixed64 => Type::UInt,
        Kind::Float | Kind::Double => Type::Double,
        Kind::String => Type::String,
        Kind::Bytes => Type::Bytes,
        Kind::Enum(_) => Type::Int,
        Kind::Message(m) if m.full_name() == TIMESTAMP => Type::Timestamp,
        Kind::Message(m) => Type::Message(m),
    })
}

/// What an expression is compiled against.
struct Scope<'s> {
    payload: &'s MessageDescriptor,
    /// Whether `event` (time and position) is there: an upcaster step sees the message alone.
    event: bool,
}

fn compile(expr: &IdedExpr, scope: &Scope<'_>) -> Result<(Node, Type), CompileError> {
    let payload = scope.payload;
    match &expr.expr {
        CelExpr::Literal(literal) => Ok(literal_node(literal)?),
        CelExpr::Ident(name) => match name.as_str() {
            "payload" => Ok((Node::Payload, Type::Message(payload.clone()))),
            "event" => refuse("`event` alone is not a value: name one of its fields, e.g. event.time"),
            other => refuse(format!(
                "unknown name `{other}`: an expression sees `payload` (the event's message) and `event` (its time and position)"
            )),
        },
        CelExpr::Select(select) => {
            if let CelExpr::Ident(root) = &select.operand.expr {
                if root == "event" && !scope.event {
                    return refuse("an upcaster step sees the message alone (`payload`), not `event`: upcasting must not depend on where an event sits in the log");
                }
                if root == "event" {
                    if select.test {
                        return refuse("has() takes a message field, not event metadata");
                    }
                    if select.field == "type" {
                        let name = super::leak(payload.full_name());
                        return Ok((Node::Const(Scalar::Str(Cow::Borrowed(name))), Type::String));
                    }
                    return META_FIELDS
                        .iter()
                        .find(|(name, ..)| *name == select.field)
                        .map(|(_, field, ty)| (Node::Meta(*field), ty.clone()))
                        .ok_or_else(|| {
                            CompileError(format!(
                                "event has no field `{}` (it has: {})",
                                select.field,
                                META_FIELDS.map(|(n, ..)| n).join(", ")
                            ))
                        });
                }
            }
            let (of, of_ty) = compile(&select.operand, scope)?;
            let Type::Message(message) = &of_ty else {
                return refuse(format!(
                    "`.{}` reads a field, but what it is read from is a {of_ty}, not a message",
                    select.field
                ));
            };
            let field = message.get_field_by_name(&select.field).ok_or_else(|| {
                CompileError(format!(
                    "message {} has no field `{}` (it has: {})",
                    message.full_name(),
                    select.field,
                    message
                        .fields()
                        .map(|f| f.name().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
            if select.test {
                return Ok((
                    Node::Has {
                        of: Box::new(of),
                        field,
                    },
                    Type::Bool,
                ));
            }
            let ty = field_type(&field)?;
            Ok((
                Node::Field {
                    of: Box::new(of),
                    field,
                    ty: ty.clone(),
                },
                ty,
            ))
        }
        CelExpr::Call(call) => compile_call(&call.func_name, call.target.as_deref(), &call.args, scope),
        CelExpr::List(_) => refuse("list literals are not supported in view expressions"),
        CelExpr::Map(_) => refuse("map literals are not supported in view expressions"),
        CelExpr::Struct(_) => refuse("message literals are not supported in view expressions"),
        CelExpr::Comprehension(_) => {
            refuse("macros over lists (all, exists, map, filter) are not supported in view expressions")
        }
        CelExpr::Unspecified => refuse("empty expression"),
    }
}

fn literal_node(literal: &LiteralValue) -> Result<(Node, Type), CompileError> {
    Ok(match literal {
        LiteralValue::Boolean(b) => (Node::Const(Scalar::Bool(*b.inner())), Type::Bool),
        LiteralValue::Int(i) => (Node::Const(Scalar::Int(*i.inner())), Type::Int),
        LiteralValue::UInt(u) => (Node::Const(Scalar::UInt(*u.inner())), Type::UInt),
        LiteralValue::Double(d) => (Node::Const(Scalar::Double(*d.inner())), Type::Double),
        LiteralValue::String(s) => (
            // Borrowed, so that evaluating the constant copies nothing (see `leak`).
            Node::Const(Scalar::Str(Cow::Borrowed(super::leak(s.inner())))),
            Type::String,
        ),
        LiteralValue::Bytes(b) => (
            Node::Const(Scalar::Bytes(Cow::Owned(b.inner().to_vec()))),
            Type::Bytes,
        ),
        LiteralValue::Null => (Node::Const(Scalar::Null), Type::Null),
    })
}

fn compile_call(
    name: &str,
    target: Option<&IdedExpr>,
    args: &[IdedExpr],
    scope: &Scope<'_>,
) -> Result<(Node, Type), CompileError> {
    use cel::common::ast::operators as op;
    let mut compiled = Vec::with_capacity(args.len() + 1);
    if let Some(t) = target {
        compiled.push(compile(t, scope)?);
    }
    for a in args {
        compiled.push(compile(a, scope)?);
    }
    let arity = |n: usize| -> Result<(), CompileError> {
        if compiled.len() == n {
            Ok(())
        } else {
            refuse(format!(
                "{name} takes {n} argument(s), got {}",
                compiled.len()
            ))
        }
    };
    let binary = |compiled: Vec<(Node, Type)>| {
        let mut it = compiled.into_iter();
        match (it.next(), it.next()) {
            (Some(a), Some(b)) => Ok((a, b)),
            _ => refuse(format!("{name} takes 2 arguments")),
        }
    };
    if name == "enum" && target.is_none() {
        return compile_enum(compiled, scope);
    }
    let arith = match name {
        op::ADD => Some(Arith::Add),
        op::SUBSTRACT => Some(Arith::Sub),
        op::MULTIPLY => Some(Arith::Mul),
        op::DIVIDE => Some(Arith::Div),
        op::MODULO => Some(Arith::Rem),
        _ => None,
    };
    if let Some(kind) = arith {
        arity(2)?;
        let ((a, at), (b, bt)) = binary(compiled)?;
        let ok = at == bt
            && (at.numeric() || (kind == Arith::Add && matches!(at, Type::String)))
            && !(kind == Arith::Rem && at == Type::Double);
        if !ok {
            return refuse(format!(
                "`{}` does not apply to {at} and {bt} (both sides must have one numeric type; + also joins strings; use int(), uint() or double() to convert)",
                symbol(name)
            ));
        }
        return Ok((Node::Arith(kind, Box::new(a), Box::new(b)), at));
    }
    let compare = match name {
        op::EQUALS => Some(Compare::Eq),
        op::NOT_EQUALS => Some(Compare::Ne),
        op::LESS => Some(Compare::Lt),
        op::LESS_EQUALS => Some(Compare::Le),
        op::GREATER => Some(Compare::Gt),
        op::GREATER_EQUALS => Some(Compare::Ge),
        _ => None,
    };
    if let Some(kind) = compare {
        arity(2)?;
        let ((a, at), (b, bt)) = binary(compiled)?;
        let comparable = at == bt
            || (at.numeric() && bt.numeric())
            || (matches!(kind, Compare::Eq | Compare::Ne)
                && (at == Type::Null || bt == Type::Null));
        if !comparable || matches!(at, Type::Message(_)) {
            return refuse(format!("`{}` cannot compare {at} with {bt}", symbol(name)));
        }
        return Ok((Node::Compare(kind, Box::new(a), Box::new(b)), Type::Bool));
    }
    match name {
        op::INDEX => {
            arity(2)?;
            let ((a, at), (b, bt)) = binary(compiled)?;
            if at != Type::Strings || bt != Type::Int {
                return refuse(format!(
                    "`[ ]` indexes a list(string) (from split) with an int, not {at} with {bt}"
                ));
            }
            Ok((Node::Call(Function::Index, vec![a, b]), Type::String))
        }
        op::LOGICAL_AND | op::LOGICAL_OR => {
            arity(2)?;
            let ((a, at), (b, bt)) = binary(compiled)?;
            if at != Type::Bool || bt != Type::Bool {
                return refuse(format!(
                    "`{}` takes two bools, got {at} and {bt}",
                    symbol(name)
                ));
            }
            let node = if name == op::LOGICAL_AND {
                Node::And(Box::new(a), Box::new(b))
            } else {
                Node::Or(Box::new(a), Box::new(b))
            };
            Ok((node, Type::Bool))
        }
        op::LOGICAL_NOT => {
            arity(1)?;
            let (a, at) = compiled.remove(0);
            if at != Type::Bool {
                return refuse(format!("`!` takes a bool, got {at}"));
            }
            Ok((Node::Not(Box::new(a)), Type::Bool))
        }
        op::NEGATE => {
            arity(1)?;
            let (a, at) = compiled.remove(0);
            if !matches!(at, Type::Int | Type::Double) {
                return refuse(format!("unary `-` takes an int or a double, got {at}"));
            }
            Ok((Node::Negate(Box::new(a)), at))
        }
        op::CONDITIONAL => {
            arity(3)?;
            let mut it = compiled.into_iter();
            let (Some((c, ct)), Some((a, at)), Some((b, bt))) = (it.next(), it.next(), it.next())
            else {
                return refuse("`? :` takes three operands");
            };
            if ct != Type::Bool {
                return refuse(format!("the condition of `? :` must be a bool, got {ct}"));
            }
            let ty = match (&at, &bt) {
                (x, y) if x == y => at.clone(),
                (Type::Null, _) => bt.clone(),
                (_, Type::Null) => at.clone(),
                _ => return refuse(format!("the two branches of `? :` differ: {at} and {bt}")),
            };
            Ok((Node::Cond(Box::new(c), Box::new(a), Box::new(b)), ty))
        }
        _ => compile_function(name, target.is_some(), compiled),
    }
}

fn symbol(operator: &str) -> &str {
    operator.trim_matches('_')
}

/// `enum('pkg.Status', text)`: the number of the value of enum `pkg.Status` named `text`, for an
/// upcaster whose older version kept as text what the newer keeps as an enum. The enum is looked up
/// now; a name that is not one of its values is an error for that event.
fn compile_enum(
    compiled: Vec<(Node, Type)>,
    scope: &Scope<'_>,
) -> Result<(Node, Type), CompileError> {
    let usage = "enum takes the enum's full name as a string literal and a string: enum('pkg.Status', payload.status)";
    let mut args = compiled.into_iter();
    let (Some((Node::Const(Scalar::Str(name)), _)), Some((text, Type::String)), None) =
        (args.next(), args.next(), args.next())
    else {
        return refuse(usage);
    };
    let Some(descriptor) = scope.payload.parent_pool().get_enum_by_name(&name) else {
        return refuse(format!(
            "enum({name:?}, ..): {name} is not an enum of the schemas"
        ));
    };
    Ok((
        Node::EnumByName {
            descriptor,
            text: Box::new(text),
        },
        Type::Int,
    ))
}

fn compile_function(
    name: &str,
    method: bool,
    compiled: Vec<(Node, Type)>,
) -> Result<(Node, Type), CompileError> {
    let types: Vec<String> = compiled.iter().map(|(_, t)| t.to_string()).collect();
    let signature = || format!("{name}({})", types.join(", "));
    let (function, result) = match (
        name,
        method,
        types
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice(),
    ) {
        ("int", false, ["int" | "uint" | "double" | "string" | "timestamp"]) => {
            (Function::Int, Type::Int)
        }
        ("uint", false, ["int" | "uint" | "double" | "string"]) => (Function::UInt, Type::UInt),
        ("double", false, ["int" | "uint" | "double" | "string"]) => {
            (Function::Double, Type::Double)
        }
        (
            "string",
            false,
            ["int" | "uint" | "double" | "string" | "bool" | "timestamp" | "date"],
        ) => (Function::String, Type::String),
        ("date", false, ["timestamp"]) => (Function::Date, Type::Date),
        ("timestamp", false, ["string"]) => (Function::Timestamp, Type::Timestamp),
        ("size", _, ["string" | "bytes" | "list(string)"]) => (Function::Size, Type::Int),
        ("split", true, ["string", "string"] | ["string", "string", "int"]) => {
            (Function::Split, Type::Strings)
        }
        ("cents", false, ["string"]) => (Function::Cents, Type::Int),
        ("utc", false, ["string"] | ["string", "string"]) => (Function::Utc, Type::Timestamp),
        ("required", false, [_]) => (Function::Required, compiled[0].1.clone()),
        ("contains", true, ["string", "string"]) => (Function::Contains, Type::Bool),
        ("startsWith", true, ["string", "string"]) => (Function::StartsWith, Type::Bool),
        ("endsWith", true, ["string", "string"]) => (Function::EndsWith, Type::Bool),
        ("lowerAscii", true, ["string"]) => (Function::Lower, Type::String),
        ("upperAscii", true, ["string"]) => (Function::Upper, Type::String),
        ("trim", true, ["string"]) => (Function::Trim, Type::String),
        (
            "int" | "uint" | "double" | "string" | "date" | "timestamp" | "size" | "contains"
            | "startsWith" | "endsWith" | "lowerAscii" | "upperAscii" | "trim" | "split" | "cents"
            | "utc",
            ..,
        ) => {
            return refuse(format!(
                "{} does not take these arguments{}",
                signature(),
                if method { " (as a method)" } else { "" }
            ))
        }
        (op, ..) if op.starts_with('_') || op.starts_with('@') || op.starts_with('!') => {
            return refuse(format!(
                "the operator `{}` is not supported in view expressions",
                symbol(op)
            ))
        }
        _ => return refuse(format!("unknown function {}", signature())),
    };
    Ok((
        Node::Call(function, compiled.into_iter().map(|(n, _)| n).collect()),
        result,
    ))
}

fn eval<'a>(node: &Node, input: &Input<'a>) -> Result<Scalar<'a>, EvalError> {
    Ok(match node {
        Node::Const(c) => c.clone(),
        Node::Payload => Scalar::Message(Some(input.payload)),
        Node::Meta(field) => {
            let meta = input.meta;
            match field {
                MetaField::Time => Scalar::Timestamp(meta.occurred_at_micros),
                MetaField::Partition => Scalar::Int(i64::from(meta.partition)),
                MetaField::Offset => Scalar::Int(meta.offset),
                MetaField::Sequence => Scalar::Int(i64::try_from(meta.sequence).map_err(|_| {
                    EvalError(format!(
                        "event.sequence {} does not fit an int",
                        meta.sequence
                    ))
                })?),
                MetaField::AggregateId => Scalar::Str(Cow::Borrowed(meta.aggregate_id.as_str())),
                MetaField::AggregateType => {
                    Scalar::Str(Cow::Borrowed(meta.aggregate_type.as_str()))
                }
                // Known per message type, so compiled to a constant.
                MetaField::TypeName => Scalar::Str(Cow::Owned(
                    input.payload.descriptor().full_name().to_string(),
                )),
            }
        }
        Node::Field { of, field, ty } => match eval(of, input)? {
            Scalar::Message(message) => read_field(message, field, ty),
            other => {
                return Err(EvalError(format!(
                    "internal: read .{} of {other:?}",
                    field.name()
                )))
            }
        },
        Node::Has { of, field } => match eval(of, input)? {
            Scalar::Message(message) => Scalar::Bool(message.is_some_and(|m| m.has_field(field))),
            other => {
                return Err(EvalError(format!(
                    "internal: has .{} of {other:?}",
                    field.name()
                )))
            }
        },
        Node::Not(a) => match eval(a, input)? {
            Scalar::Bool(b) => Scalar::Bool(!b),
            other => return Err(EvalError(format!("`!` of {other:?}"))),
        },
        Node::Negate(a) => match eval(a, input)? {
            Scalar::Int(i) => Scalar::Int(
                i.checked_neg()
                    .ok_or_else(|| EvalError(format!("-({i}) overflows an int")))?,
            ),
            Scalar::Double(d) => Scalar::Double(-d),
            other => return Err(EvalError(format!("`-` of {other:?}"))),
        },
        Node::Arith(kind, a, b) => arith(*kind, eval(a, input)?, eval(b, input)?)?,
        Node::Compare(kind, a, b) => {
            Scalar::Bool(compare(*kind, &eval(a, input)?, &eval(b, input)?))
        }
        Node::And(a, b) => Scalar::Bool(truth(eval(a, input)?)? && truth(eval(b, input)?)?),
        Node::Or(a, b) => Scalar::Bool(truth(eval(a, input)?)? || truth(eval(b, input)?)?),
        Node::Cond(c, a, b) => {
            if truth(eval(c, input)?)? {
                eval(a, input)?
            } else {
                eval(b, input)?
            }
        }
        Node::EnumByName { descriptor, text } => match eval(text, input)? {
            Scalar::Null => Scalar::Null,
            Scalar::Str(name) => match descriptor.get_value_by_name(&name) {
                Some(value) => Scalar::Int(i64::from(value.number())),
                None => {
                    let names: Vec<String> =
                        descriptor.values().map(|v| v.name().to_string()).collect();
                    return Err(EvalError(format!(
                        "{name:?} is not a value of enum {} ({})",
                        descriptor.full_name(),
                        names.join(", ")
                    )));
                }
            },
            other => return Err(EvalError(format!("internal: enum of {other:?}"))),
        },
        Node::Call(function, args) => {
            let mut values = Arguments::new();
            for a in args {
                values.push(eval(a, input)?);
            }
            call(*function, values)?
        }
    })
}

fn truth(value: Scalar<'_>) -> Result<bool, EvalError> {
    match value {
        Scalar::Bool(b) => Ok(b),
        other => Err(EvalError(format!("expected a bool, got {other:?}"))),
    }
}

fn read_field<'a>(
    message: Option<&'a DynamicMessage>,
    field: &FieldDescriptor,
    ty: &Type,
) -> Scalar<'a> {
    // One look-up: prost-reflect lends a value it stores and makes an owned default for one it
    // does not (a proto3 field that is present with its default value reads the same either way).
    match message.map(|m| m.get_field(field)) {
        Some(Cow::Borrowed(v)) => scalar_of(v, ty),
        _ => default_of(ty),
    }
}

fn default_of(ty: &Type) -> Scalar<'static> {
    match ty {
        Type::Bool => Scalar::Bool(false),
        Type::Int => Scalar::Int(0),
        Type::UInt => Scalar::UInt(0),
        Type::Double => Scalar::Double(0.0),
        Type::String => Scalar::Str(Cow::Borrowed("")),
        Type::Bytes => Scalar::Bytes(Cow::Borrowed(&[])),
        Type::Message(_) => Scalar::Message(None),
        Type::Null | Type::Timestamp | Type::Date | Type::Strings => Scalar::Null,
    }
}

fn scalar_of<'a>(value: &'a PbValue, ty: &Type) -> Scalar<'a> {
    match value {
        PbValue::Bool(b) => Scalar::Bool(*b),
        PbValue::I32(i) => Scalar::Int(i64::from(*i)),
        PbValue::I64(i) => Scalar::Int(*i),
        PbValue::U32(u) => Scalar::UInt(u64::from(*u)),
        PbValue::U64(u) => Scalar::UInt(*u),
        PbValue::F32(f) => Scalar::Double(f64::from(*f)),
        PbValue::F64(f) => Scalar::Double(*f),
        PbValue::String(s) => Scalar::Str(Cow::Borrowed(s.as_str())),
        PbValue::Bytes(b) => Scalar::Bytes(Cow::Borrowed(b.as_ref())),
        PbValue::EnumNumber(n) => Scalar::Int(i64::from(*n)),
        PbValue::Message(m) if *ty == Type::Timestamp => timestamp_of(m),
        PbValue::Message(m) => Scalar::Message(Some(m)),
        PbValue::List(_) | PbValue::Map(_) => Scalar::Null,
    }
}

/// A `google.protobuf.Timestamp` as microseconds; out of range (or malformed) is NULL, as the
/// compiled projections treat it.
fn timestamp_of(message: &DynamicMessage) -> Scalar<'static> {
    let number = |n: u32| message.get_field_by_number(n).map(|v| v.into_owned());
    let seconds = match number(1) {
        Some(PbValue::I64(s)) => s,
        _ => 0,
    };
    let nanos = match number(2) {
        Some(PbValue::I32(n)) => n,
        _ => 0,
    };
    let ts = prost_types::Timestamp { seconds, nanos };
    crate::envelope::timestamp_micros(&ts).map_or(Scalar::Null, Scalar::Timestamp)
}

fn arith<'a>(kind: Arith, a: Scalar<'a>, b: Scalar<'a>) -> Result<Scalar<'a>, EvalError> {
    let overflow = |x: &dyn fmt::Debug, y: &dyn fmt::Debug| {
        EvalError(format!(
            "{x:?} {} {y:?} overflows or divides by zero",
            arith_symbol(kind)
        ))
    };
    // The same checked operation on either integer type.
    macro_rules! checked {
        ($x:expr, $y:expr) => {
            match kind {
                Arith::Add => $x.checked_add($y),
                Arith::Sub => $x.checked_sub($y),
                Arith::Mul => $x.checked_mul($y),
                Arith::Div => $x.checked_div($y),
                Arith::Rem => $x.checked_rem($y),
            }
        };
    }
    Ok(match (a, b) {
        (Scalar::Int(x), Scalar::Int(y)) => {
            Scalar::Int(checked!(x, y).ok_or_else(|| overflow(&x, &y))?)
        }
        (Scalar::UInt(x), Scalar::UInt(y)) => {
            Scalar::UInt(checked!(x, y).ok_or_else(|| overflow(&x, &y))?)
        }
        (Scalar::Double(x), Scalar::Double(y)) => Scalar::Double(match kind {
            Arith::Add => x + y,
            Arith::Sub => x - y,
            Arith::Mul => x * y,
            Arith::Div => x / y,
            Arith::Rem => x % y,
        }),
        (Scalar::Str(x), Scalar::Str(y)) if kind == Arith::Add => {
            Scalar::Str(Cow::Owned(format!("{x}{y}")))
        }
        // A NULL (an unset timestamp) makes the result NULL, as in SQL.
        (Scalar::Null, _) | (_, Scalar::Null) => Scalar::Null,
        (x, y) => return Err(EvalError(format!("{x:?} {} {y:?}", arith_symbol(kind)))),
    })
}

fn arith_symbol(kind: Arith) -> &'static str {
    match kind {
        Arith::Add => "+",
        Arith::Sub => "-",
        Arith::Mul => "*",
        Arith::Div => "/",
        Arith::Rem => "%",
    }
}

fn compare(kind: Compare, a: &Scalar<'_>, b: &Scalar<'_>) -> bool {
    use std::cmp::Ordering;
    let ordering: Option<Ordering> = match (a, b) {
        (Scalar::Int(x), Scalar::Int(y)) => Some(x.cmp(y)),
        (Scalar::UInt(x), Scalar::UInt(y)) => Some(x.cmp(y)),
        (Scalar::Int(x), Scalar::UInt(y)) => Some(i128::from(*x).cmp(&i128::from(*y))),
        (Scalar::UInt(x), Scalar::Int(y)) => Some(i128::from(*x).cmp(&i128::from(*y))),
        (Scalar::Double(x), Scalar::Double(y)) => x.partial_cmp(y),
        (Scalar::Double(x), Scalar::Int(y)) => x.partial_cmp(&(*y as f64)),
        (Scalar::Int(x), Scalar::Double(y)) => (*x as f64).partial_cmp(y),
        (Scalar::Double(x), Scalar::UInt(y)) => x.partial_cmp(&(*y as f64)),
        (Scalar::UInt(x), Scalar::Double(y)) => (*x as f64).partial_cmp(y),
        (Scalar::Str(x), Scalar::Str(y)) => Some(x.cmp(y)),
        (Scalar::Bytes(x), Scalar::Bytes(y)) => Some(x.cmp(y)),
        (Scalar::Bool(x), Scalar::Bool(y)) => Some(x.cmp(y)),
        (Scalar::Timestamp(x), Scalar::Timestamp(y)) => Some(x.cmp(y)),
        (Scalar::Date(x), Scalar::Date(y)) => Some(x.cmp(y)),
        (Scalar::Null, Scalar::Null) => Some(Ordering::Equal),
        _ => None,
    };
    match (kind, ordering) {
        (Compare::Eq, o) => o == Some(Ordering::Equal),
        (Compare::Ne, o) => o != Some(Ordering::Equal),
        (_, None) => false,
        (Compare::Lt, Some(o)) => o == Ordering::Less,
        (Compare::Le, Some(o)) => o != Ordering::Greater,
        (Compare::Gt, Some(o)) => o == Ordering::Greater,
        (Compare::Ge, Some(o)) => o != Ordering::Less,
    }
}

/// A call's evaluated arguments: inline, as calls are made per event.
type Arguments<'a> = smallvec::SmallVec<[Scalar<'a>; 3]>;

fn call<'a>(function: Function, mut args: Arguments<'a>) -> Result<Scalar<'a>, EvalError> {
    let first = if args.is_empty() {
        return Err(EvalError(format!(
            "internal: {function:?} without arguments"
        )));
    } else {
        args.remove(0)
    };
    let text_arg = |args: &[Scalar<'a>]| -> Result<String, EvalError> {
        match args.first() {
            Some(Scalar::Str(s)) => Ok(s.to_string()),
            other => Err(EvalError(format!("internal: {function:?} with {other:?}"))),
        }
    };
    Ok(match (function, first) {
        (_, Scalar::Null) => Scalar::Null,
        (Function::Int, Scalar::Int(i)) => Scalar::Int(i),
        (Function::Int, Scalar::UInt(u)) => {
            Scalar::Int(i64::try_from(u).map_err(|_| EvalError(format!("int({u}): out of range")))?)
        }
        (Function::Int, Scalar::Double(d)) => {
            if d.is_finite() && d >= i64::MIN as f64 && d < i64::MAX as f64 {
                Scalar::Int(d.trunc() as i64)
            } else {
                return Err(EvalError(format!("int({d}): out of range")));
            }
        }
        (Function::Int, Scalar::Str(s)) => Scalar::Int(
            s.trim()
                .parse()
                .map_err(|_| EvalError(format!("int({s:?}): not an integer")))?,
        ),
        (Function::Int, Scalar::Timestamp(micros)) => Scalar::Int(micros.div_euclid(1_000_000)),
        (Function::UInt, Scalar::Int(i)) => {
            Scalar::UInt(u64::try_from(i).map_err(|_| EvalError(format!("uint({i}): negative")))?)
        }
        (Function::UInt, Scalar::UInt(u)) => Scalar::UInt(u),
        (Function::UInt, Scalar::Double(d)) => {
            if d.is_finite() && d >= 0.0 && d < u64::MAX as f64 {
                Scalar::UInt(d.trunc() as u64)
            } else {
                return Err(EvalError(format!("uint({d}): out of range")));
            }
        }
        (Function::UInt, Scalar::Str(s)) => Scalar::UInt(
            s.trim()
                .parse()
                .map_err(|_| EvalError(format!("uint({s:?}): not an unsigned integer")))?,
        ),
        (Function::Double, Scalar::Int(i)) => Scalar::Double(i as f64),
        (Function::Double, Scalar::UInt(u)) => Scalar::Double(u as f64),
        (Function::Double, Scalar::Double(d)) => Scalar::Double(d),
        (Function::Double, Scalar::Str(s)) => Scalar::Double(
            s.trim()
                .parse()
                .map_err(|_| EvalError(format!("double({s:?}): not a number")))?,
        ),
        (Function::String, Scalar::Str(s)) => Scalar::Str(s),
        (Function::String, Scalar::Timestamp(t)) => {
            Scalar::Str(Cow::Owned(Value::Timestamp(t).to_string()))
        }
        (Function::String, Scalar::Date(d)) => Scalar::Str(Cow::Owned(Value::Date(d).to_string())),
        (Function::String, other) => Scalar::Str(Cow::Owned(match other {
            Scalar::Int(i) => i.to_string(),
            Scalar::UInt(u) => u.to_string(),
            Scalar::Double(d) => d.to_string(),
            Scalar::Bool(b) => b.to_string(),
            other => return Err(EvalError(format!("internal: string({other:?})"))),
        })),
        (Function::Date, Scalar::Timestamp(micros)) => {
            Scalar::Date(micros.div_euclid(86_400_000_000) as i32)
        }
        (Function::Timestamp, Scalar::Str(s)) => {
            let parsed = chrono::DateTime::parse_from_rfc3339(s.trim())
                .map_err(|e| EvalError(format!("timestamp({s:?}): not RFC 3339 ({e})")))?;
            Scalar::Timestamp(parsed.timestamp_micros())
        }
        (Function::Size, Scalar::Str(s)) => Scalar::Int(s.chars().count() as i64),
        (Function::Size, Scalar::Bytes(b)) => Scalar::Int(b.len() as i64),
        (Function::Contains, Scalar::Str(s)) => Scalar::Bool(s.contains(text_arg(&args)?.as_str())),
        (Function::StartsWith, Scalar::Str(s)) => {
            Scalar::Bool(s.starts_with(text_arg(&args)?.as_str()))
        }
        (Function::EndsWith, Scalar::Str(s)) => {
            Scalar::Bool(s.ends_with(text_arg(&args)?.as_str()))
        }
        (Function::Lower, Scalar::Str(s)) => Scalar::Str(Cow::Owned(s.to_ascii_lowercase())),
        (Function::Upper, Scalar::Str(s)) => Scalar::Str(Cow::Owned(s.to_ascii_uppercase())),
        (Function::Trim, Scalar::Str(s)) => match s {
            Cow::Borrowed(b) => Scalar::Str(Cow::Borrowed(b.trim())),
            Cow::Owned(o) => Scalar::Str(Cow::Owned(o.trim().to_string())),
        },
        (Function::Size, Scalar::Strings(list)) => Scalar::Int(list.len() as i64),
        (Function::Split, Scalar::Str(s)) => {
            let separator = text_arg(&args)?;
            let limit = match args.get(1) {
                Some(Scalar::Int(n)) if *n > 0 => Some(*n as usize),
                Some(Scalar::Int(n)) => {
                    return Err(EvalError(format!(
                        "split: a limit of {n}; it must be 1 or more"
                    )))
                }
                _ => None,
            };
            Scalar::Strings(match limit {
                Some(n) => s
                    .splitn(n, separator.as_str())
                    .map(str::to_string)
                    .collect(),
                None => s.split(separator.as_str()).map(str::to_string).collect(),
            })
        }
        (Function::Index, Scalar::Strings(mut list)) => match args.first() {
            Some(Scalar::Int(i)) if *i >= 0 && (*i as usize) < list.len() => {
                Scalar::Str(Cow::Owned(list.swap_remove(*i as usize)))
            }
            other => {
                return Err(EvalError(format!(
                    "index {other:?} is outside the list {list:?}"
                )))
            }
        },
        (Function::Cents, Scalar::Str(s)) => Scalar::Int(decimal_cents(&s)?),
        (Function::Utc, Scalar::Str(s)) => {
            let zone = match args.first() {
                Some(Scalar::Str(z)) => Some(z.to_string()),
                _ => None,
            };
            Scalar::Timestamp(local_time_micros(&s, zone.as_deref())?)
        }
        (Function::Required, Scalar::Str(s)) if s.is_empty() => {
            return Err(EvalError(REQUIRED_BUT_EMPTY.to_string()))
        }
        (Function::Required, value) => value,
        (function, other) => return Err(EvalError(format!("internal: {function:?} of {other:?}"))),
    })
}

fn decimal_cents(text: &str) -> Result<i64, EvalError> {
    crate::upcast::convert::decimal_cents(text)
        .map_err(|r| EvalError(format!("cents({text:?}): {r}")))
}

/// `utc(text)` or `utc(local, zone)`.
fn local_time_micros(text: &str, zone: Option<&str>) -> Result<i64, EvalError> {
    use crate::upcast::convert;
    let shown = || match zone {
        Some(z) => format!("utc({text:?}, {z:?})"),
        None => format!("utc({text:?})"),
    };
    let (local, zone) = match zone {
        Some(z) => (text, z),
        None => convert::split_zoned(text).map_err(|r| EvalError(format!("{}: {r}", shown())))?,
    };
    convert::local_time_micros(local, zone).map_err(|r| EvalError(format!("{}: {r}", shown())))
}

/// A computed value as a column of type `column`.
pub fn to_column(value: Scalar<'_>, column: ColumnType) -> Result<Value, EvalError> {
    let mismatch = |v: &Scalar<'_>| {
        EvalError(format!(
            "{v:?} cannot be stored in a {} column",
            column.pg_name()
        ))
    };
    Ok(match (value, column) {
        (Scalar::Null, _) => Value::Null,
        (Scalar::Bool(b), ColumnType::Bool) => Value::Bool(b),
        (Scalar::Int(i), ColumnType::BigInt) => Value::BigInt(i),
        (Scalar::UInt(u), ColumnType::BigInt) => Value::BigInt(
            i64::try_from(u).map_err(|_| EvalError(format!("{u} does not fit a bigint column")))?,
        ),
        (Scalar::Int(i), ColumnType::Integer) => Value::Integer(
            i32::try_from(i)
                .map_err(|_| EvalError(format!("{i} does not fit an integer column")))?,
        ),
        (Scalar::UInt(u), ColumnType::Integer) => Value::Integer(
            i32::try_from(u)
                .map_err(|_| EvalError(format!("{u} does not fit an integer column")))?,
        ),
        (Scalar::Int(i), ColumnType::Numeric) => Value::Numeric(Decimal::from(i)),
        (Scalar::UInt(u), ColumnType::Numeric) => Value::Numeric(Decimal::from(u)),
        (Scalar::Int(i), ColumnType::Double) => Value::Double(Double(i as f64)),
        (Scalar::UInt(u), ColumnType::Double) => Value::Double(Double(u as f64)),
        (Scalar::Double(d), ColumnType::Double) => Value::double(d),
        (Scalar::Str(s), ColumnType::Text) => Value::text(s.as_ref()),
        (Scalar::Str(s), ColumnType::Numeric) => Value::Numeric(
            s.trim()
                .parse()
                .map_err(|_| EvalError(format!("{s:?} is not a numeric")))?,
        ),
        (Scalar::Str(s), ColumnType::Uuid) => Value::Uuid(
            s.trim()
                .parse()
                .map_err(|e| EvalError(format!("{s:?} is not a uuid: {e}")))?,
        ),
        (Scalar::Str(s), ColumnType::Jsonb) => {
            let document: serde_json::Value = serde_json::from_str(&s)
                .map_err(|e| EvalError(format!("{s:?} is not JSON: {e}")))?;
            Value::json(&document)
        }
        (Scalar::Bytes(b), ColumnType::Bytea) => Value::Bytes(b.into_owned()),
        (Scalar::Timestamp(t), ColumnType::Timestamp) => Value::Timestamp(t),
        (Scalar::Date(d), ColumnType::Date) => Value::Date(d),
        (other, _) => return Err(mismatch(&other)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA: &str = r#"
        syntax = "proto3";
        package sales.v1;
        import "google/protobuf/timestamp.proto";
        message Address { string city = 1; string country = 2; }
        enum Channel { CHANNEL_UNKNOWN = 0; WEB = 1; STORE = 2; }
        message OrderPlaced {
            string order_id = 1;
            string customer_id = 2;
            string currency = 3;
            google.protobuf.Timestamp placed_at = 4;
            Address ship_to = 5;
        }
    "#;

    /// The test schema, compiled the way a domain's `schemas` folder is (once: the tests run side by
    /// side and would rewrite the file under each other).
    fn placed() -> MessageDescriptor {
        static PLACED: std::sync::OnceLock<MessageDescriptor> = std::sync::OnceLock::new();
        PLACED
            .get_or_init(|| {
                let dir = std::env::temp_dir().join(format!("rp-expr-test-{}", std::process::id()));
                std::fs::create_dir_all(&dir).expect("temp dir");
                std::fs::write(dir.join("sales.proto"), SCHEMA).expect("write the schema");
                let mut compiler = protox::Compiler::new([&dir]).expect("compiler");
                compiler.include_imports(true);
                compiler
                    .open_file("sales.proto")
                    .expect("the schema compiles");
                compiler
                    .descriptor_pool()
                    .get_message_by_name("sales.v1.OrderPlaced")
                    .expect("sales.v1.OrderPlaced")
            })
            .clone()
    }

    fn compiled(source: &str) -> Result<Compiled, String> {
        Compiled::new(source, &placed()).map_err(|e| e.to_string())
    }

    fn message(json: &str) -> DynamicMessage {
        let mut de = serde_json::Deserializer::from_str(json);
        DynamicMessage::deserialize(placed(), &mut de).expect("test message")
    }

    fn eval_on(source: &str, json: &str) -> Result<Scalar<'static>, String> {
        let expr = compiled(source)?;
        let payload = message(json);
        let meta = EventMeta {
            partition: 3,
            offset: 41,
            aggregate_id: "o-1".into(),
            occurred_at_micros: 1_735_732_800_000_000,
            ..EventMeta::default()
        };
        let input = Input {
            payload: &payload,
            meta: &meta,
        };
        let value = expr.eval(&input).map_err(|e| e.to_string())?;
        Ok(match value {
            Scalar::Str(s) => Scalar::Str(Cow::Owned(s.into_owned())),
            Scalar::Bytes(b) => Scalar::Bytes(Cow::Owned(b.into_owned())),
            Scalar::Message(_) => Scalar::Null,
            Scalar::Null => Scalar::Null,
            Scalar::Bool(b) => Scalar::Bool(b),
            Scalar::Int(i) => Scalar::Int(i),
            Scalar::UInt(u) => Scalar::UInt(u),
            Scalar::Double(d) => Scalar::Double(d),
            Scalar::Timestamp(t) => Scalar::Timestamp(t),
            Scalar::Date(d) => Scalar::Date(d),
            Scalar::Strings(l) => Scalar::Strings(l),
        })
    }

    const ORDER: &str = r#"{"orderId": "o-1", "customerId": "c-9", "currency": "EUR",
        "placedAt": "2025-01-01T12:00:00Z", "shipTo": {"city": "Berlin", "country": "DE"}}"#;

    #[test]
    fn fields_metadata_and_operators_evaluate_on_the_message_in_place() {
        let s = |x: &str| Scalar::Str(Cow::Owned(x.to_string()));
        assert_eq!(eval_on("payload.customer_id", ORDER), Ok(s("c-9")));
        assert_eq!(eval_on("payload.ship_to.city", ORDER), Ok(s("Berlin")));
        assert_eq!(
            eval_on("event.partition * 10 + event.offset", ORDER),
            Ok(Scalar::Int(71))
        );
        assert_eq!(
            eval_on("date(payload.placed_at)", ORDER),
            Ok(Scalar::Date(20_089))
        );
        assert_eq!(
            eval_on("payload.placed_at == event.time", ORDER),
            Ok(Scalar::Bool(true))
        );
        assert_eq!(
            eval_on(
                "has(payload.ship_to) ? payload.ship_to.country : null",
                ORDER
            ),
            Ok(s("DE"))
        );
        assert_eq!(
            eval_on(
                "has(payload.ship_to) ? payload.ship_to.country : null",
                r#"{"orderId": "o-2"}"#
            ),
            Ok(Scalar::Null)
        );
        // An unset timestamp is NULL; an unset nested message reads as defaults.
        assert_eq!(eval_on("payload.placed_at", r#"{}"#), Ok(Scalar::Null));
        assert_eq!(eval_on("payload.ship_to.city", r#"{}"#), Ok(s("")));
        assert_eq!(
            eval_on(
                "payload.currency.lowerAscii() + '-' + string(event.offset)",
                ORDER
            ),
            Ok(s("eur-41"))
        );
    }

    #[test]
    fn mistakes_are_refused_before_any_event_with_what_is_wrong() {
        let err = |source: &str| compiled(source).expect_err(source);
        assert!(err("payload.custmer_id")
            .contains("message sales.v1.OrderPlaced has no field `custmer_id`"));
        assert!(err("payload.customer_id +").contains("does not parse as CEL"));
        assert!(err("payload.customer_id + 1").contains("does not apply to string and int"));
        assert!(err("now()").contains("unknown function now()"));
        assert!(err("event.wall_clock").contains("event has no field `wall_clock`"));
        assert!(err("[1, 2]").contains("list literals are not supported"));
        assert!(err("true ? 1 : 'x'").contains("branches of `? :` differ: int and string"));
        assert!(
            err("date(payload.customer_id)").contains("date(string) does not take these arguments")
        );
        assert!(err("orders").contains("unknown name `orders`"));
    }

    #[test]
    fn what_only_the_value_can_tell_is_an_error_for_that_event() {
        assert!(eval_on("int(payload.customer_id)", ORDER)
            .expect_err("not a number")
            .contains("int(\"c-9\"): not an integer"));
        assert!(eval_on("9223372036854775807 + event.offset", ORDER)
            .expect_err("overflow")
            .contains("overflows"));
        assert!(to_column(Scalar::Int(1 << 40), ColumnType::Integer)
            .expect_err("out of range")
            .to_string()
            .contains("does not fit an integer column"));
    }

    #[test]
    fn conversions_for_real_histories_are_exact_and_refuse_what_they_cannot_read() {
        let s = |x: &str| Scalar::Str(Cow::Owned(x.to_string()));
        assert_eq!(
            eval_on("cents('12.5') + cents('-0.05') + cents('3')", ORDER),
            Ok(Scalar::Int(1545))
        );
        assert!(eval_on("cents('12.505')", ORDER)
            .expect_err("3 decimals")
            .contains("not a decimal amount"));
        assert!(eval_on("cents('1,50')", ORDER)
            .expect_err("comma")
            .contains("not a decimal amount"));
        // 02:30 in Berlin on the last Sunday of March 2024 never happened; 12:00 CET is 11:00 UTC.
        assert_eq!(
            eval_on("utc('2024-01-15 12:00:00 Europe/Berlin')", ORDER),
            Ok(Scalar::Timestamp(1_705_316_400_000_000))
        );
        assert_eq!(
            eval_on("utc('2024-01-15 12:00:00', 'Europe/Berlin') == utc('2024-01-15 12:00:00 Europe/Berlin')", ORDER),
            Ok(Scalar::Bool(true))
        );
        assert!(eval_on("utc('2024-03-31 02:30:00 Europe/Berlin')", ORDER)
            .expect_err("skipped")
            .contains("a clock change skipped it"));
        assert!(eval_on("utc('2024-01-15 12:00:00 Mars/Olympus')", ORDER)
            .expect_err("zone")
            .contains("unknown time zone"));
        assert_eq!(
            eval_on(
                "'5 Market Street, 10115 New York, US'.split(', ')[1].split(' ', 2)[1]",
                ORDER
            ),
            Ok(s("New York"))
        );
        assert!(eval_on("'a, b'.split(', ')[2]", ORDER)
            .expect_err("out of range")
            .contains("outside the list"));
        assert_eq!(eval_on("required(payload.currency)", ORDER), Ok(s("EUR")));
        assert!(eval_on("required(payload.ship_to.city)", "{}")
            .expect_err("empty")
            .contains("a required value is empty"));
    }

    #[test]
    fn text_becomes_an_enum_number_and_a_name_it_does_not_know_is_refused_for_that_event() {
        assert_eq!(
            eval_on(
                "enum('sales.v1.Channel', payload.currency == 'EUR' ? 'STORE' : 'WEB')",
                ORDER
            ),
            Ok(Scalar::Int(2))
        );
        assert_eq!(
            eval_on("enum('sales.v1.Channel', 'PHONE')", ORDER),
            Err(
                "\"PHONE\" is not a value of enum sales.v1.Channel (CHANNEL_UNKNOWN, WEB, STORE)"
                    .to_string()
            )
        );
        assert!(compiled("enum('sales.v1.Nothing', 'WEB')")
            .is_err_and(|e| e.contains("sales.v1.Nothing is not an enum of the schemas")));
        assert!(compiled("enum(payload.currency, 'WEB')")
            .is_err_and(|e| e.contains("the enum's full name as a string literal")));
        assert!(compiled("enum('sales.v1.Channel', 1)").is_err());
    }

    #[test]
    fn types_say_which_columns_an_expression_fits() {
        assert_eq!(
            compiled("payload.placed_at").map(|c| c.ty().clone()),
            Ok(Type::Timestamp)
        );
        assert!(Type::Int.fits(ColumnType::BigInt));
        assert!(!Type::String.fits(ColumnType::BigInt));
        assert!(!Type::Timestamp.fits(ColumnType::Date));
        assert!(Type::Null.fits(ColumnType::Date));
    }
}
