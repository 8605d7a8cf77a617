//! A domain defined by files: a team's Protobuf schemas and its views, read at start-up by the stock
//! binary (`reproject --domain DIR ...`), so that a new view is a new file rather than a new build of
//! the tool. It is one more [`Domain`], run by the same engine as a compiled one.
//!
//! ```text
//! DIR/domain.toml                 name, topics, where the schemas are, which messages are events
//! DIR/upcasters.toml              steps from older message versions to those (optional)
//! DIR/views/<view>/v<N>.toml      one file per view version (see `view.rs` for what it holds)
//! ```
//!
//! ```toml
//! name = "sales"
//! topics = ["sales.orders"]
//! schemas = "protos"              # a folder of .proto files, compiled at start-up (protox), or
//! # descriptors = "sales.binpb"   # a descriptor set from `buf build -o` or `protoc --descriptor_set_out`
//! events = ["sales.v2.*"]         # the messages events are read as: full names, or `package.*`
//! ```
//!
//! Everything is checked when it is loaded, before anything is read: every problem is reported at
//! once with its file and line ([`Problems`]). Payloads are decoded dynamically (prost-reflect) and
//! each view's expressions were compiled against the descriptors, so nothing is parsed per event.
//!
//! DIR/upcasters.toml (optional) holds the steps from older message versions to the event types
//! (see `upcast.rs`).
//!
//! Each build records two hashes (see [`crate::domain::Definition`]): its view file's, which may not
//! change under a version that has builds, and that of the schemas and upcasters, which may (a
//! fixed upcaster is a reason to rebuild) and which `status` compares with the active builds'.

pub mod expr;
mod upcast;
mod view;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor};
use serde::Deserialize;
use toml::Spanned;

use crate::domain::Domain;
use crate::projection::{DynProjection, Projection, SchemaSql};
use crate::upcast::{Registry, RegistryError};

pub use view::{valid_name, FileView};

/// The file the domain's folder holds its settings in.
pub const DOMAIN_FILE: &str = "domain.toml";

/// An event of a file-defined domain: its message at its latest version, and which of the domain's
/// event types it is (an index, so that a view finds its handlers without comparing names).
#[derive(Clone, Debug)]
pub struct FileEvent {
    pub kind: usize,
    pub message: DynamicMessage,
}

/// One problem in a domain's files.
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    /// The file, relative to the domain's folder.
    pub file: String,
    pub line: Option<usize>,
    pub message: String,
}

/// Every problem found in a domain's files, each with its file and line.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Problems {
    pub list: Vec<Problem>,
}

impl Problems {
    pub fn add(&mut self, file: &str, line: Option<usize>, message: impl Into<String>) {
        self.list.push(Problem {
            file: file.to_string(),
            line,
            message: message.into(),
        });
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// One line per problem, each file shown under `dir`, as a terminal or an editor reads them.
    pub fn render(&self, dir: &Path) -> String {
        self.list
            .iter()
            .map(|p| {
                let file = dir.join(&p.file);
                match p.line {
                    Some(line) => format!("{}:{line}: {}", file.display(), p.message),
                    None => format!("{}: {}", file.display(), p.message),
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.list.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            match p.line {
                Some(line) => write!(f, "{}:{line}: {}", p.file, p.message)?,
                None => write!(f, "{}: {}", p.file, p.message)?,
            }
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

/// Names the engine keeps as `&'static str` (projection, table and column names, message names in
/// the upcaster registry) come from files here. They are read once per process, so they are
/// leaked rather than threaded through every signature as owned strings.
fn leak(text: &str) -> &'static str {
    Box::leak(text.to_string().into_boxed_str())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DomainFile {
    name: String,
    topics: Vec<String>,
    #[serde(default)]
    schemas: Option<Spanned<String>>,
    #[serde(default)]
    descriptors: Option<Spanned<String>>,
    events: Spanned<Vec<String>>,
}

/// A domain read from a folder of files; see the module docs.
pub struct FileDomain {
    name: String,
    topics: Vec<&'static str>,
    descriptors: Vec<u8>,
    /// The event types, by [`FileEvent::kind`].
    events: Vec<(&'static str, MessageDescriptor)>,
    /// Steps from older message versions towards the event types.
    steps: Vec<Arc<upcast::FileStep>>,
    /// Every version of every view, sorted by name then version.
    views: Vec<Arc<FileView>>,
    /// See [`crate::domain::Definition::inputs_hash`].
    inputs_hash: String,
    /// What it was read from (the folder, and the schemas when they lie outside it), and a
    /// fingerprint of those files as they were read, for [`Domain::reload`].
    dir: PathBuf,
    watched: Vec<PathBuf>,
    fingerprint: String,
}

/// SHA-256 (hex) of every file under `paths` (a file or a folder, recursively): names and contents,
/// in name order. A missing path counts as empty.
fn fingerprint(paths: &[PathBuf]) -> String {
    use sha2::Digest;
    fn walk(path: &Path, hasher: &mut sha2::Sha256) {
        if path.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
                .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
                .unwrap_or_default();
            entries.sort();
            for entry in entries {
                walk(&entry, hasher);
            }
        } else if let Ok(bytes) = std::fs::read(path) {
            hasher.update(path.to_string_lossy().as_bytes());
            hasher.update((bytes.len() as u64).to_le_bytes());
            hasher.update(&bytes);
        }
    }
    let mut hasher = sha2::Sha256::new();
    for path in paths {
        walk(path, &mut hasher);
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl FileDomain {
    /// Read and check the domain in `dir`; every problem is returned at once.
    pub fn load(dir: &Path) -> Result<FileDomain, Problems> {
        let mut problems = Problems::default();
        let domain_path = dir.join(DOMAIN_FILE);
        let text = std::fs::read_to_string(&domain_path).map_err(|e| {
            let mut p = Problems::default();
            p.add(
                &domain_path.display().to_string(),
                None,
                format!("cannot read the domain's settings: {e}"),
            );
            p
        })?;
        let settings: DomainFile = toml::from_str(&text).map_err(|e| {
            let mut p = Problems::default();
            p.add(
                DOMAIN_FILE,
                e.span().map(|s| view::line_of(&text, s.start)),
                e.message().to_string(),
            );
            p
        })?;
        let line = |offset: usize| Some(view::line_of(&text, offset));
        // Fingerprinted before the files are read: a change made while they are is seen next time.
        let mut watched = vec![dir.to_path_buf()];
        for outside in [&settings.schemas, &settings.descriptors]
            .into_iter()
            .flatten()
        {
            let path = dir.join(outside.get_ref());
            if !path.starts_with(dir) {
                watched.push(path);
            }
        }
        let fingerprint = fingerprint(&watched);
        let (pool, descriptors) = match (&settings.schemas, &settings.descriptors) {
            (Some(folder), None) => compile_protos(dir, folder, &text, &mut problems),
            (None, Some(file)) => read_descriptor_set(dir, file, &text, &mut problems),
            _ => {
                problems.add(
                    DOMAIN_FILE,
                    None,
                    "name exactly one of `schemas` (a folder of .proto files) and `descriptors` (an encoded descriptor set)",
                );
                None
            }
        }
        .ok_or_else(|| problems.clone())?;

        let mut events: Vec<(&'static str, MessageDescriptor)> = Vec::new();
        for pattern in settings.events.get_ref() {
            let matched: Vec<MessageDescriptor> = match pattern.strip_suffix(".*") {
                Some(package) => pool
                    .all_messages()
                    .filter(|m| m.parent_message().is_none() && m.package_name() == package)
                    .collect(),
                None => pool.get_message_by_name(pattern).into_iter().collect(),
            };
            if matched.is_empty() {
                problems.add(
                    DOMAIN_FILE,
                    line(settings.events.span().start),
                    format!("events: {pattern:?} names no message of the schemas"),
                );
            }
            for m in matched {
                if !events.iter().any(|(n, _)| *n == m.full_name()) {
                    events.push((leak(m.full_name()), m));
                }
            }
        }
        if settings.topics.is_empty() {
            problems.add(DOMAIN_FILE, None, "topics: name at least one topic");
        }

        let (steps, upcasters_hash) = upcast::load(dir, &pool, &mut problems);
        check_chains(&steps, &events, &mut problems);
        let descriptors_only: Vec<MessageDescriptor> =
            events.iter().map(|(_, d)| d.clone()).collect();
        let views = load_views(dir, &descriptors_only, &mut problems);
        if !problems.is_empty() {
            return Err(problems);
        }
        let inputs_hash = inputs_hash(&descriptors, &events, &upcasters_hash);
        Ok(FileDomain {
            name: settings.name,
            topics: settings.topics.iter().map(|t| leak(t)).collect(),
            descriptors,
            events,
            steps: steps.into_iter().map(Arc::new).collect(),
            views,
            inputs_hash,
            dir: dir.to_path_buf(),
            watched,
            fingerprint,
        })
    }
}

/// SHA-256 (hex) of what every view reads events through: the schemas as descriptors without their
/// source information (comments and layout do not count), the event types in order, and the
/// upcaster steps as parsed (`upcasters_hash`, see [`view::declaration_hash`]).
fn inputs_hash(
    descriptors: &[u8],
    events: &[(&str, MessageDescriptor)],
    upcasters_hash: &str,
) -> String {
    use prost::Message as _;
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    match prost_types::FileDescriptorSet::decode(descriptors) {
        Ok(mut set) => {
            for file in &mut set.file {
                file.source_code_info = None;
            }
            hasher.update(set.encode_to_vec());
        }
        // Already decoded once by the pool; should it fail here, the bytes as read still say
        // whether the schemas changed.
        Err(_) => hasher.update(descriptors),
    }
    for (name, _) in events {
        hasher.update(name.as_bytes());
        hasher.update([0]);
    }
    hasher.update(upcasters_hash.as_bytes());
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Every step's chain must end at an event type, without a cycle and with one step per message:
/// said here with the file, before the registry would refuse it without one.
fn check_chains(
    steps: &[upcast::FileStep],
    events: &[(&'static str, MessageDescriptor)],
    problems: &mut Problems,
) {
    let is_event = |name: &str| events.iter().any(|(n, _)| *n == name);
    for (i, step) in steps.iter().enumerate() {
        if is_event(step.from) {
            problems.add(
                upcast::UPCASTERS_FILE,
                None,
                format!(
                    "a step starts from {}, which is an event type (a latest version)",
                    step.from
                ),
            );
        }
        if steps[..i].iter().any(|s| s.from == step.from) {
            problems.add(
                upcast::UPCASTERS_FILE,
                None,
                format!("{} has two steps", step.from),
            );
            continue;
        }
        let mut path = vec![step.from];
        let mut current = step.to;
        loop {
            if is_event(current) {
                break;
            }
            if path.contains(&current) {
                path.push(current);
                problems.add(
                    upcast::UPCASTERS_FILE,
                    None,
                    format!("the steps form a cycle: {}", path.join(" -> ")),
                );
                break;
            }
            path.push(current);
            match steps.iter().find(|s| s.from == current) {
                Some(next) => current = next.to,
                None => {
                    problems.add(
                        upcast::UPCASTERS_FILE,
                        None,
                        format!(
                            "{} has no path to a latest version: {} is neither an event type of domain.toml nor the start of a step",
                            step.from,
                            path.join(" -> ")
                        ),
                    );
                    break;
                }
            }
        }
    }
}

fn compile_protos(
    dir: &Path,
    folder: &Spanned<String>,
    text: &str,
    problems: &mut Problems,
) -> Option<(DescriptorPool, Vec<u8>)> {
    let root = dir.join(folder.get_ref());
    let line = Some(view::line_of(text, folder.span().start));
    let mut files = Vec::new();
    if let Err(e) = proto_files(&root, &root, &mut files) {
        problems.add(
            DOMAIN_FILE,
            line,
            format!("schemas: cannot list {}: {e}", root.display()),
        );
        return None;
    }
    if files.is_empty() {
        problems.add(
            DOMAIN_FILE,
            line,
            format!("schemas: {} holds no .proto file", root.display()),
        );
        return None;
    }
    files.sort();
    let compiled = protox::Compiler::new([&root]).and_then(|mut c| {
        c.include_imports(true);
        c.open_files(&files)?;
        Ok(c)
    });
    match compiled {
        Ok(compiler) => Some((
            compiler.descriptor_pool(),
            compiler.encode_file_descriptor_set(),
        )),
        Err(e) => {
            let shown = e
                .file()
                .map(|f| format!("{}/{f}", folder.get_ref()))
                .unwrap_or_else(|| folder.get_ref().clone());
            problems.add(&shown, None, format!("the schemas do not compile: {e}"));
            None
        }
    }
}

/// Every `.proto` file under `dir`, relative to `root`.
fn proto_files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            proto_files(root, &path, out)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            if let Ok(relative) = path.strip_prefix(root) {
                out.push(relative.to_path_buf());
            }
        }
    }
    Ok(())
}

fn read_descriptor_set(
    dir: &Path,
    file: &Spanned<String>,
    text: &str,
    problems: &mut Problems,
) -> Option<(DescriptorPool, Vec<u8>)> {
    let path = dir.join(file.get_ref());
    let line = Some(view::line_of(text, file.span().start));
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) => {
            problems.add(
                DOMAIN_FILE,
                line,
                format!("descriptors: cannot read {}: {e}", path.display()),
            );
            return None;
        }
    };
    match DescriptorPool::decode(bytes.as_slice()) {
        Ok(pool) => Some((pool, bytes)),
        Err(e) => {
            problems.add(
                DOMAIN_FILE,
                line,
                format!(
                    "descriptors: {} is not an encoded FileDescriptorSet: {e}",
                    path.display()
                ),
            );
            None
        }
    }
}

fn load_views(
    dir: &Path,
    events: &[MessageDescriptor],
    problems: &mut Problems,
) -> Vec<Arc<FileView>> {
    let root = dir.join("views");
    let mut views = Vec::new();
    let names = match std::fs::read_dir(&root) {
        Ok(entries) => entries,
        Err(e) => {
            problems.add(
                "views",
                None,
                format!("cannot list the views folder {}: {e}", root.display()),
            );
            return views;
        }
    };
    let mut folders: Vec<PathBuf> = names.filter_map(|e| e.ok().map(|e| e.path())).collect();
    folders.sort();
    for folder in folders {
        let name = folder
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !folder.is_dir() {
            problems.add(
                &format!("views/{name}"),
                None,
                "expected a folder per view, holding v<N>.toml files",
            );
            continue;
        }
        let mut files: Vec<PathBuf> = match std::fs::read_dir(&folder) {
            Ok(entries) => entries.filter_map(|e| e.ok().map(|e| e.path())).collect(),
            Err(e) => {
                problems.add(&format!("views/{name}"), None, format!("cannot list: {e}"));
                continue;
            }
        };
        files.sort();
        for file in files {
            let file_name = file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let shown = format!("views/{name}/{file_name}");
            let version = file_name
                .strip_prefix('v')
                .and_then(|rest| rest.strip_suffix(".toml"))
                .and_then(|n| n.parse::<u32>().ok())
                .filter(|v| *v > 0);
            let Some(version) = version else {
                problems.add(
                    &shown,
                    None,
                    "a view file is named v<N>.toml, N a version from 1 up",
                );
                continue;
            };
            if let Some(view) = FileView::load(&file, &shown, &name, version, events, problems) {
                views.push(Arc::new(view));
            }
        }
    }
    views.sort_by(|a, b| (a.name(), a.version()).cmp(&(b.name(), b.version())));
    if views.is_empty() && problems.is_empty() {
        problems.add(
            "views",
            None,
            "no view is defined: add views/<name>/v1.toml",
        );
    }
    views
}

impl Domain for FileDomain {
    type Event = FileEvent;

    fn name(&self) -> &str {
        &self.name
    }

    fn default_topics(&self) -> &[&str] {
        &self.topics
    }

    fn registry(&self) -> Result<Registry<FileEvent>, RegistryError> {
        let mut builder = Registry::builder();
        for (kind, (name, descriptor)) in self.events.iter().enumerate() {
            builder = builder.latest_dynamic(name, descriptor.clone(), move |message| FileEvent {
                kind,
                message,
            });
        }
        for step in &self.steps {
            let apply = step.clone();
            builder =
                builder.step_dynamic(step.from, step.from_descriptor.clone(), step.to, move |m| {
                    apply.apply(m)
                });
        }
        builder.build()
    }

    fn projections(&self) -> Vec<DynProjection<FileEvent>> {
        // The latest version of each view: `views` is sorted by name, then version.
        let mut latest: Vec<DynProjection<FileEvent>> = Vec::new();
        for view in &self.views {
            match latest.last() {
                Some(last) if last.name() == view.name() => {
                    if let Some(slot) = latest.last_mut() {
                        *slot = view.clone();
                    }
                }
                _ => latest.push(view.clone()),
            }
        }
        latest
    }

    fn schema(&self, projection: &str, version: u32) -> Option<SchemaSql> {
        self.views
            .iter()
            .find(|v| v.name() == projection && v.version() == version)
            .map(|v| v.sql().clone())
    }

    fn descriptors(&self) -> &[u8] {
        &self.descriptors
    }

    fn definitions(&self) -> Vec<crate::domain::Definition> {
        self.views
            .iter()
            .map(|v| v.definition(&self.inputs_hash))
            .collect()
    }

    fn reload(&self) -> Option<Result<FileDomain, String>> {
        if fingerprint(&self.watched) == self.fingerprint {
            return None;
        }
        // Names are leaked to `&'static str` at each load: bounded by how often files are edited.
        Some(FileDomain::load(&self.dir).map_err(|problems| problems.render(&self.dir)))
    }
}
