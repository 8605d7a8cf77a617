//! The upcaster registry: small pure steps, each turning one versioned message into the next version,
//! keyed by message name (`billing.v1.Invoice` -> `billing.v2.Invoice`).
//!
//! The registry is checked when it is built, before any event is read: every message that is not a
//! latest version must have a path of steps to one, there are no cycles, no message has two steps,
//! and each step's input and output types are the ones registered for those names. A violation is an
//! error naming the message, so a broken chain fails a deploy rather than a rebuild hours in.
//!
//! Steps work on decoded messages (`Box<dyn Any>`), not bytes, so a v1 event is decoded once and never
//! re-encoded on the hot path. `replay` asks for each intermediate message as bytes to show it as JSON.

pub mod convert;

use std::any::{Any, TypeId};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use prost::Message;
use rustc_hash::FxHashMap;

use crate::envelope::message_name;

type AnyMessage = Box<dyn Any + Send>;
type DecodeFn = Arc<dyn Fn(&[u8]) -> Result<AnyMessage, prost::DecodeError> + Send + Sync>;
type EncodeFn = Arc<dyn Fn(&(dyn Any + Send)) -> Option<Vec<u8>> + Send + Sync>;
type StepFn = Arc<dyn Fn(AnyMessage) -> Result<AnyMessage, StepError> + Send + Sync>;
type FinishFn<E> = Arc<dyn Fn(AnyMessage) -> Option<E> + Send + Sync>;

/// Why one step could not turn its input into the next version: the value it could not convert and
/// what it expected.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct StepError(pub String);

impl StepError {
    pub fn new(reason: impl Into<String>) -> StepError {
        StepError(reason.into())
    }
}

/// A registry that cannot serve: found when it is built.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("message {name} is registered twice (two steps, or a step and a latest version)")]
    Duplicate { name: String },
    #[error("upcaster step {from} -> {to}: {to} is not registered")]
    UnknownTarget { from: String, to: String },
    #[error("upcaster step {from} -> {to}: the step's {side} type differs from the type registered for {name}")]
    TypeMismatch {
        from: String,
        to: String,
        side: &'static str,
        name: String,
    },
    #[error("upcaster steps form a cycle through {name}: {path}")]
    Cycle { name: String, path: String },
}

/// An event that could not be brought to its latest version. The caller adds where it was read.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpcastError {
    #[error("no upcaster knows the payload type {type_url}")]
    UnknownType { type_url: String },
    #[error("payload of type {name} does not decode: {reason}")]
    Undecodable { name: String, reason: String },
    #[error("upcaster step {from} -> {to} failed: {source}")]
    StepFailed {
        from: String,
        to: String,
        source: StepError,
    },
}

enum Kind<E> {
    Step {
        to: &'static str,
        output: TypeId,
        apply: StepFn,
    },
    Latest {
        finish: FinishFn<E>,
    },
}

struct Entry<E> {
    decode: DecodeFn,
    encode: EncodeFn,
    input: TypeId,
    kind: Kind<E>,
}

/// Builds a [`Registry`]; see the module docs for what `build` checks.
pub struct RegistryBuilder<E> {
    entries: Vec<(&'static str, Entry<E>)>,
}

impl<E: 'static> Default for RegistryBuilder<E> {
    fn default() -> Self {
        RegistryBuilder {
            entries: Vec::new(),
        }
    }
}

fn decode_as<M: Message + Default + Send + 'static>(
    bytes: &[u8],
) -> Result<AnyMessage, prost::DecodeError> {
    Ok(Box::new(M::decode(bytes)?))
}

/// Decoding and re-encoding of a message known by its descriptor. Every dynamic message has one Rust
/// type, so the registry's type check passes trivially; the file-defined domain checks names and
/// fields itself before it builds the registry.
fn dynamic_entry<E>(descriptor: prost_reflect::MessageDescriptor, kind: Kind<E>) -> Entry<E> {
    Entry {
        decode: Arc::new(move |bytes: &[u8]| {
            Ok(Box::new(prost_reflect::DynamicMessage::decode(
                descriptor.clone(),
                bytes,
            )?) as AnyMessage)
        }),
        encode: Arc::new(|msg: &(dyn Any + Send)| {
            msg.downcast_ref::<prost_reflect::DynamicMessage>()
                .map(Message::encode_to_vec)
        }),
        input: TypeId::of::<prost_reflect::DynamicMessage>(),
        kind,
    }
}

fn encode_as<M: Message + 'static>(msg: &(dyn Any + Send)) -> Option<Vec<u8>> {
    msg.downcast_ref::<M>().map(Message::encode_to_vec)
}

impl<E: 'static> RegistryBuilder<E> {
    /// Register a latest version: messages of this name are handed to projections as `wrap(message)`.
    pub fn latest<M>(mut self, name: &'static str, wrap: fn(M) -> E) -> Self
    where
        M: Message + Default + Send + 'static,
    {
        let finish: FinishFn<E> =
            Arc::new(move |msg: AnyMessage| msg.downcast::<M>().ok().map(|m| wrap(*m)));
        self.entries.push((
            name,
            Entry {
                decode: Arc::new(decode_as::<M>),
                encode: Arc::new(encode_as::<M>),
                input: TypeId::of::<M>(),
                kind: Kind::Latest { finish },
            },
        ));
        self
    }

    /// Register a latest version known only at run time, by its descriptor (a file-defined domain):
    /// decoded as a [`prost_reflect::DynamicMessage`] and handed to projections as `wrap(message)`.
    pub fn latest_dynamic(
        mut self,
        name: &'static str,
        descriptor: prost_reflect::MessageDescriptor,
        wrap: impl Fn(prost_reflect::DynamicMessage) -> E + Send + Sync + 'static,
    ) -> Self {
        let finish: FinishFn<E> = Arc::new(move |msg: AnyMessage| {
            msg.downcast::<prost_reflect::DynamicMessage>()
                .ok()
                .map(|m| wrap(*m))
        });
        self.entries
            .push((name, dynamic_entry(descriptor, Kind::Latest { finish })));
        self
    }

    /// Register a step between two versions known only at run time, each a
    /// [`prost_reflect::DynamicMessage`] of its descriptor.
    pub fn step_dynamic(
        mut self,
        from: &'static str,
        descriptor: prost_reflect::MessageDescriptor,
        to: &'static str,
        step: impl Fn(prost_reflect::DynamicMessage) -> Result<prost_reflect::DynamicMessage, StepError>
            + Send
            + Sync
            + 'static,
    ) -> Self {
        let apply: StepFn = Arc::new(move |msg: AnyMessage| {
            let input = msg
                .downcast::<prost_reflect::DynamicMessage>()
                .map_err(|_| {
                    StepError::new("internal: the step received a message of another type")
                })?;
            Ok(Box::new(step(*input)?) as AnyMessage)
        });
        let kind = Kind::Step {
            to,
            output: TypeId::of::<prost_reflect::DynamicMessage>(),
            apply,
        };
        self.entries.push((from, dynamic_entry(descriptor, kind)));
        self
    }

    /// Register a step from message `from` (decoded as `A`) to message `to` (of type `B`).
    pub fn step<A, B>(
        mut self,
        from: &'static str,
        to: &'static str,
        step: fn(A) -> Result<B, StepError>,
    ) -> Self
    where
        A: Message + Default + Send + 'static,
        B: Message + Default + Send + 'static,
    {
        let apply: StepFn = Arc::new(move |msg: AnyMessage| {
            let input = msg.downcast::<A>().map_err(|_| {
                StepError::new("internal: the step received a message of another type")
            })?;
            Ok(Box::new(step(*input)?) as AnyMessage)
        });
        self.entries.push((
            from,
            Entry {
                decode: Arc::new(decode_as::<A>),
                encode: Arc::new(encode_as::<A>),
                input: TypeId::of::<A>(),
                kind: Kind::Step {
                    to,
                    output: TypeId::of::<B>(),
                    apply,
                },
            },
        ));
        self
    }

    /// Drop what was registered for message `name`: to replace one step of a chain someone else
    /// registered (a fix being tried out, a test's deliberately broken version).
    pub fn without(mut self, name: &str) -> Self {
        self.entries.retain(|(n, _)| *n != name);
        self
    }

    pub fn build(self) -> Result<Registry<E>, RegistryError> {
        let mut entries: FxHashMap<&'static str, Entry<E>> = FxHashMap::default();
        for (name, entry) in self.entries {
            if entries.insert(name, entry).is_some() {
                return Err(RegistryError::Duplicate {
                    name: name.to_string(),
                });
            }
        }
        for (name, entry) in &entries {
            if let Kind::Step { to, output, .. } = &entry.kind {
                let target = entries
                    .get(to)
                    .ok_or_else(|| RegistryError::UnknownTarget {
                        from: name.to_string(),
                        to: to.to_string(),
                    })?;
                if target.input != *output {
                    return Err(RegistryError::TypeMismatch {
                        from: name.to_string(),
                        to: to.to_string(),
                        side: "output",
                        name: to.to_string(),
                    });
                }
            }
        }
        // Every chain must end in a latest version: walk it, and a name seen twice is a cycle.
        for start in entries.keys() {
            let mut seen = HashSet::new();
            let mut path = vec![*start];
            let mut current = *start;
            while let Some(Entry {
                kind: Kind::Step { to, .. },
                ..
            }) = entries.get(current)
            {
                if !seen.insert(current) {
                    return Err(RegistryError::Cycle {
                        name: start.to_string(),
                        path: path.join(" -> "),
                    });
                }
                current = to;
                path.push(current);
            }
        }
        Ok(Registry { entries })
    }
}

/// A checked set of upcaster chains. Cheap to share between threads.
pub struct Registry<E> {
    entries: FxHashMap<&'static str, Entry<E>>,
}

/// One step of a chain as `replay` shows it: the message name and the message, re-encoded.
pub struct TracedStep {
    pub name: String,
    pub encoded: Vec<u8>,
}

/// Called with each version's message name and bytes as an upcast goes through it (`replay` shows
/// every step).
type OnVersion<'a> = Option<&'a mut dyn FnMut(&str, Vec<u8>)>;

impl<E: 'static> Registry<E> {
    pub fn builder() -> RegistryBuilder<E> {
        RegistryBuilder::default()
    }

    /// Bring a payload to its latest version.
    pub fn upcast(&self, type_url: &str, payload: &[u8]) -> Result<E, UpcastError> {
        self.run(type_url, payload, None)
    }

    /// Like [`Registry::upcast`], and also report each version the message passed through, first the
    /// stored one, as encoded bytes.
    pub fn upcast_traced(
        &self,
        type_url: &str,
        payload: &[u8],
    ) -> (Vec<TracedStep>, Result<E, UpcastError>) {
        let mut trace = Vec::new();
        let mut record = |name: &str, encoded: Vec<u8>| {
            trace.push(TracedStep {
                name: name.to_string(),
                encoded,
            })
        };
        let result = self.run(type_url, payload, Some(&mut record));
        (trace, result)
    }

    fn run(
        &self,
        type_url: &str,
        payload: &[u8],
        mut on_version: OnVersion<'_>,
    ) -> Result<E, UpcastError> {
        let mut name = message_name(type_url);
        let mut entry = self
            .entries
            .get(name)
            .ok_or_else(|| UpcastError::UnknownType {
                type_url: type_url.to_string(),
            })?;
        let mut message = (entry.decode)(payload).map_err(|e| UpcastError::Undecodable {
            name: name.to_string(),
            reason: e.to_string(),
        })?;
        loop {
            // Re-encoding costs; only a traced run (replay) pays for it.
            if let Some(listener) = on_version.as_mut() {
                if let Some(encoded) = (entry.encode)(message.as_ref()) {
                    listener(name, encoded);
                }
            }
            match &entry.kind {
                Kind::Latest { finish } => {
                    return finish(message).ok_or_else(|| UpcastError::Undecodable {
                        name: name.to_string(),
                        reason: "internal: latest version has an unexpected type".to_string(),
                    })
                }
                Kind::Step { to, apply, .. } => {
                    message = apply(message).map_err(|source| UpcastError::StepFailed {
                        from: name.to_string(),
                        to: to.to_string(),
                        source,
                    })?;
                    name = to;
                    entry = self
                        .entries
                        .get(name)
                        .ok_or_else(|| UpcastError::UnknownType {
                            type_url: name.to_string(),
                        })?;
                }
            }
        }
    }

    /// Every registered message name with the name of its latest version, sorted.
    pub fn chains(&self) -> BTreeMap<&'static str, Vec<&'static str>> {
        let mut out = BTreeMap::new();
        for start in self.entries.keys() {
            let mut chain = vec![*start];
            let mut current = *start;
            while let Some(Entry {
                kind: Kind::Step { to, .. },
                ..
            }) = self.entries.get(current)
            {
                chain.push(to);
                current = to;
            }
            out.insert(*start, chain);
        }
        out
    }

    pub fn knows(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }
}

// The registry's tests need real messages: they use the example domain's, beside its upcasters.
