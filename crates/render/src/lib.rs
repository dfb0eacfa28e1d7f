//! Rendering: a pure function from validated [`Settings`] to the files that make
//! the stack a set of systemd services.
//!
//! Invariants:
//! - [`render`] cannot fail and reads nothing but its argument: the same settings
//!   give the same bytes (files are ordered, nothing depends on time or host).
//! - Resource values are rendered literally (`MemoryMax=90G`): systemd does not
//!   expand environment variables in resource directives.
//! - Every file starts with a header naming its source and telling operators to
//!   put local changes in drop-ins, which Citadel never writes or removes.
//! - Configured strings reach a file only through the typed values of the
//!   `writer` module (one gate): `Literal` for `Description=` and
//!   `SyslogIdentifier=`, `Account` for `User=`/`Group=` and the owners in
//!   sysusers.d/tmpfiles.d, `EnvAssignment` for `Environment=` and
//!   `LogExtraFields=`, `ExecLine` for `ExecStart=`, `UnitPath` for
//!   `ReadWritePaths=` and `DeviceAllow=`, `Credential` for `LoadCredential=`,
//!   `TableField` for tmpfiles.d/sysusers.d columns, `Token` for typed numbers,
//!   sizes and spans. Each quotes and escapes (`%%`, `$$` only in `ExecStart=`
//!   arguments, C escapes only where systemd decodes them) exactly as systemd's
//!   parser for that directive reads it; the table with the reasons is in
//!   `writer.rs`. What cannot be written so that systemd reads it as meant
//!   (a line break, NUL, a relative path, ...) is left out with a comment, and
//!   an unusable `User=`/`Group=` fails closed ([`INVALID_ACCOUNT`]): no
//!   configured string can add a line or a directive.
//!   `tests/parse_back.rs` reads the files back the way systemd does and
//!   checks this for arbitrary strings (proptest).
//! - Span arithmetic saturates (`TimeoutStopSec=` is `stop_timeout + 15s`);
//!   a span systemd cannot hold is rendered as `infinity`.

mod gpu;
mod network;
mod units;
mod writer;

use std::path::{Path, PathBuf};

use citadel_config::Settings;

pub use gpu::{GpuBinding, Host, MODULES_LOAD_FILE};
pub use units::{hardening_exceptions, DROP_IN_NAME, FAILURE_UNIT, GENERATED_MARK};
pub use writer::INVALID_ACCOUNT;

/// What a rendered file is, which decides where it is installed.
///
/// Everything Citadel generates goes into the *vendor* layer below `/usr/local`
/// (issue 10, item 3), the layer packaged software uses, never into `/etc`,
/// which belongs to the administrator: `systemctl edit` writes
/// `/etc/systemd/system/UNIT.d/override.conf` on top of Citadel's files, and
/// `systemctl revert` removes the administrator's layer and leaves Citadel's
/// (it treats unit files below `/usr` as vendor versions). systemd 252 searches
/// all three directories (`systemd-analyze unit-paths`, and the built-in
/// `/usr/local/lib/{sysusers,tmpfiles}.d` of systemd-sysusers/-tmpfiles).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FileKind {
    /// A unit file, installed into [`VENDOR_UNIT_DIR`].
    Unit,
    /// A drop-in of a unit (`NAME.d/50-citadel.conf`), installed beside the units.
    DropIn,
    /// A sysusers.d entry, installed into `/usr/local/lib/sysusers.d`.
    Sysusers,
    /// A tmpfiles.d entry, installed into `/usr/local/lib/tmpfiles.d`.
    Tmpfiles,
    /// A modules-load.d entry (the NVIDIA modules, when a model has GPUs),
    /// installed into `/usr/local/lib/modules-load.d` (issue 10, item 5).
    ModulesLoad,
}

/// Where Citadel's units and drop-ins are installed: the vendor unit directory
/// for locally installed software, below the administrator's `/etc/systemd/system`.
pub const VENDOR_UNIT_DIR: &str = "/usr/local/lib/systemd/system";

/// The administrator's unit directory. Citadel writes nothing there itself:
/// systemd puts the enablement symlinks there, operators their drop-ins.
/// Citadel versions before issue 10 installed their generated files there
/// (`install` removes those, recognised by [`GENERATED_MARK`]).
pub const ADMIN_UNIT_DIR: &str = "/etc/systemd/system";

/// Where versions before issue 10 put a file of `kind` (relative to `/`);
/// `install` migrates Citadel's own files away from there.
pub fn legacy_dir(kind: FileKind) -> &'static str {
    match kind {
        FileKind::Unit | FileKind::DropIn => "etc/systemd/system",
        FileKind::Sysusers | FileKind::Tmpfiles => "etc",
        // Added with issue 10: never installed in /etc.
        FileKind::ModulesLoad => "etc",
    }
}

/// One rendered file. `path` is relative to the render directory
/// (`/opt/citadel/config/systemd`), e.g. `citadel-model@phi3.service.d/50-citadel.conf`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedFile {
    pub path: PathBuf,
    pub kind: FileKind,
    pub contents: String,
}

impl RenderedFile {
    /// Where the file goes on an installed system, below `root` (`/` normally).
    pub fn install_path(&self, root: &Path) -> PathBuf {
        let dir = match self.kind {
            FileKind::Unit | FileKind::DropIn => &VENDOR_UNIT_DIR[1..],
            FileKind::Sysusers | FileKind::Tmpfiles | FileKind::ModulesLoad => "usr/local/lib",
        };
        root.join(dir).join(&self.path)
    }

    /// Where Citadel versions before issue 10 installed this file, below `root`.
    pub fn legacy_install_path(&self, root: &Path) -> PathBuf {
        root.join(legacy_dir(self.kind)).join(&self.path)
    }
}

/// The rendered stack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// All files, ordered by path.
    pub files: Vec<RenderedFile>,
    /// The units `install` enables (the target, the gateway's socket, the gateway,
    /// every model instance).
    pub enable: Vec<String>,
    /// The units `validate` checks with `systemd-analyze` (instances, not the template).
    pub verify: Vec<String>,
}

impl Rendered {
    pub fn file(&self, path: &str) -> Option<&RenderedFile> {
        self.files.iter().find(|f| f.path == Path::new(path))
    }
}

/// The drop-in of one instance of a model, for a unit `render_with` does not
/// make: the CLI's temporary surge instance of a surge restart (issue 15),
/// `citadel-model@NAME:surge.service`, whose drop-in goes to
/// `/run/systemd/system/citadel-model@NAME:surge.service.d/`.
///
/// `model` is the model as that instance runs it (e.g. the Model of
/// `Settings::instance(..)` with its port replaced); `instance_name` is
/// `NAME` (instance 1), `NAME:N` or `NAME:SUFFIX`, where `NAME` is
/// `model.name`. Every name but `NAME` gets its own cache and state
/// directories `citadel/NAME/SUFFIX` (`citadel/phi3/surge`), the
/// `SyslogIdentifier=citadel-NAME-SUFFIX` and
/// `LogExtraFields=CITADEL_INSTANCE=NAME:SUFFIX`. For a configured instance
/// name the text is the one [`render_with`] gives for it (with `model`). An
/// instance the config does not name starts after every configured instance
/// it shares a GPU with.
///
/// The surge port is not rendered here: the text ends in the `[Service]`
/// section, so the caller appends `Environment=CITADEL_SURGE_PORT=P` as a
/// last line. Pure; cannot fail (a suffix that is not a directory name of
/// `[A-Za-z0-9._-]` gets no cache/state directories, with a comment).
pub fn instance_dropin(
    settings: &Settings,
    host: &Host,
    model: &citadel_config::Model,
    instance_name: &str,
) -> String {
    units::instance_drop_in_text(settings, model, instance_name, host)
}

/// Renders the whole stack for a host about which nothing is known (GPU
/// indexes unresolved: see [`render_with`]). Pure and deterministic; see the
/// crate docs.
pub fn render(settings: &Settings) -> Rendered {
    render_with(settings, &Host::default())
}

/// Renders the whole stack with the facts found on the host it is for (the
/// resolved GPUs). Pure and deterministic: the same settings and host give the
/// same bytes.
pub fn render_with(settings: &Settings, host: &Host) -> Rendered {
    let mut files = vec![
        units::target(settings),
        units::model_template(settings),
        units::gateway(settings),
        units::failure_template(settings),
        units::sysusers(settings),
        units::tmpfiles(settings),
        network::gateway_socket(settings),
        network::gateway_admin_socket(settings),
    ];
    files.extend(network::netns_unit(settings));
    // One drop-in per local instance (issue 15): `citadel-model@NAME.service.d`
    // for instance 1, `citadel-model@NAME:N.service.d` for instance N.
    files.extend(settings.models.iter().flat_map(|m| {
        m.local_instances().into_iter().map(move |(n, inst)| {
            units::instance_drop_in(settings, &inst, &m.instance_name(n), host)
        })
    }));
    files.extend(gpu::modules_load(settings, &units::header(settings, "#")));
    files.sort_by(|a, b| a.path.cmp(&b.path));

    let model_units: Vec<String> = settings
        .models
        .iter()
        .flat_map(|m| (1..=m.instance_count()).map(|n| m.instance_unit(n)))
        .collect();
    let mut enable = vec![
        citadel_config::unit_names::TARGET.to_owned(),
        citadel_config::unit_names::GATEWAY_SOCKET.to_owned(),
        citadel_config::unit_names::GATEWAY_ADMIN_SOCKET.to_owned(),
        citadel_config::unit_names::GATEWAY.to_owned(),
    ];
    enable.extend(model_units.iter().cloned());
    let mut verify = vec![
        citadel_config::unit_names::TARGET.to_owned(),
        citadel_config::unit_names::GATEWAY_SOCKET.to_owned(),
        citadel_config::unit_names::GATEWAY_ADMIN_SOCKET.to_owned(),
        citadel_config::unit_names::GATEWAY.to_owned(),
    ];
    if settings.engine_network().is_isolated() {
        verify.push(citadel_config::unit_names::NETNS.to_owned());
    }
    verify.extend(model_units);
    Rendered {
        files,
        enable,
        verify,
    }
}
