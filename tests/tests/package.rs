//! The Debian package (issue 19, part 3), as `scripts/build-deb` builds it: its files, modes,
//! units, man pages, completions and control data checked with dpkg-deb against what the
//! repository and the packaged binaries say they should be; lintian's verdict; and the
//! package installed, used, upgraded in place, removed and purged in a booted Debian
//! container (`kmsfs_tests::nspawn`).
//!
//! Every test runs `scripts/build-deb` first: a release build, and `cargo deb` when anything
//! that goes into the package changed (the first run in a fresh clone also compiles
//! cargo-deb into ~/.cargo/bin, once). Concurrent runs wait for each other.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use kmsfs_tests::nspawn::{unit_source, Container};
use kmsfs_tests::ROOT_USES_EVERYTHING;

/// The repository's root.
fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The package, built (or found current) by `scripts/build-deb`, at the lowest CPU priority:
/// the release build runs beside the rest of the suite.
fn package() -> PathBuf {
    let out = Command::new("nice")
        .args(["-n", "19"])
        .arg(repo().join("scripts/build-deb"))
        .output()
        .expect("run scripts/build-deb");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "scripts/build-deb failed ({}):\n{stderr}", out.status);
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    let path = PathBuf::from(stdout.trim());
    assert!(
        path.is_file() && path.extension().is_some_and(|e| e == "deb"),
        "scripts/build-deb printed {stdout:?}, not the path of a .deb; it said:\n{stderr}"
    );
    path
}

/// Runs a host command; it must succeed. Returns its stdout.
fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(out.status.success(), "{program} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

/// One entry of `dpkg-deb --contents`: its mode string, owner and link target.
#[derive(Debug)]
struct Entry {
    mode: String,
    owner: String,
    link: Option<String>,
}

/// `dpkg-deb --contents`: path (without the leading `./`) → entry, directories left out.
fn contents(deb: &Path) -> BTreeMap<String, Entry> {
    let listing = run("dpkg-deb", &["--contents", deb.to_str().expect("utf-8 path")]);
    let mut entries = BTreeMap::new();
    for line in listing.lines() {
        // drwxr-xr-x root/root 0 2026-12-07 00:00 ./usr/  (`./a -> b` for a symlink)
        let mut fields = line.split_whitespace();
        let (mode, owner) = (fields.next().unwrap_or_default(), fields.next().unwrap_or_default());
        let rest = fields.skip(3).collect::<Vec<_>>().join(" ");
        assert!(!rest.is_empty(), "unexpected dpkg-deb --contents line: {line}");
        let (path, link) = match rest.split_once(" -> ") {
            Some((path, target)) => (path.to_string(), Some(target.to_string())),
            None => (rest, None),
        };
        if mode.starts_with('d') {
            continue;
        }
        let path = path.strip_prefix("./").unwrap_or(&path).to_string();
        entries.insert(path, Entry { mode: mode.to_string(), owner: owner.to_string(), link });
    }
    entries
}

/// The package unpacked (`dpkg-deb -x`) into a temporary directory.
fn unpack(deb: &Path) -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix("kmsfs-deb-").tempdir().expect("tempdir");
    run("dpkg-deb", &["-x", deb.to_str().expect("utf-8"), dir.path().to_str().expect("utf-8")]);
    dir
}

/// A gzip file's contents, checked to be made as Debian's policy asks (`gzip -9n`: no file
/// name, no time stamp).
fn gunzip(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert!(bytes.len() > 10 && bytes[..2] == [0x1f, 0x8b], "{} is not gzip", path.display());
    assert_eq!(bytes[3] & 0x08, 0, "{} carries a file name (gzip without -n)", path.display());
    assert_eq!(bytes[4..8], [0, 0, 0, 0], "{} carries a time stamp (gzip without -n)", path.display());
    let mut child = Command::new("gzip")
        .args(["-dc"])
        .stdin(std::fs::File::open(path).expect("open"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run gzip");
    let mut out = Vec::new();
    child.stdout.take().expect("stdout").read_to_end(&mut out).expect("read gzip");
    assert!(child.wait().expect("gzip").success(), "gzip -d {}", path.display());
    out
}

/// A repository unit (or drop-in) as the package must ship it: the binaries' directory
/// rewritten from /usr/local/bin (the README's manual installation) to /usr/bin, nothing else.
fn packaged_unit(name: &str) -> String {
    let text = std::fs::read_to_string(unit_source(name)).unwrap_or_else(|e| panic!("read systemd/{name}: {e}"));
    text.replace("/usr/local/bin/", "/usr/bin/")
}

/// The drop-ins of the repository's systemd/kmsd.service.d/.
fn drop_ins() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(unit_source("kmsd.service.d"))
        .expect("read systemd/kmsd.service.d")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .filter(|n| n.ends_with(".conf"))
        .collect();
    names.sort();
    names
}

/// What `--generate man` makes of a packaged binary: page file name → roff.
fn generated_pages(binary: &Path) -> BTreeMap<String, Vec<u8>> {
    let dir = tempfile::Builder::new().prefix("kmsfs-man-").tempdir().expect("tempdir");
    let dir_arg = dir.path().to_str().expect("utf-8");
    run(binary.to_str().expect("utf-8"), &["--generate", "man", "--generate-dir", dir_arg]);
    std::fs::read_dir(dir.path())
        .expect("read generated pages")
        .map(|e| {
            let e = e.expect("entry");
            (e.file_name().into_string().expect("utf-8"), std::fs::read(e.path()).expect("read page"))
        })
        .collect()
}

#[test]
fn contents_modes_units_man_pages_completions_and_control() {
    let deb = package();
    let files = contents(&deb);
    let root = unpack(&deb);
    let at = |path: &str| root.path().join(path);

    // Everything belongs to root, and nothing is shipped in /etc (no conffiles: /etc/kmsd
    // and /etc/kmsfs are made by tmpfiles.d), /var or /usr/local.
    for (path, entry) in &files {
        assert!(["root/root", "0/0"].contains(&entry.owner.as_str()), "{path} is owned by {}", entry.owner);
        assert!(path.starts_with("usr/") || path.starts_with("sbin/"), "{path}: outside /usr and /sbin");
        assert!(!path.starts_with("usr/local/"), "{path}: in /usr/local");
    }
    let conffiles = Command::new("dpkg-deb").arg("--info").arg(&deb).arg("conffiles").output().expect("dpkg-deb");
    assert!(!conffiles.status.success(), "the package has conffiles: {}", String::from_utf8_lossy(&conffiles.stdout));

    // The binaries, and mount.kmsfs for `mount -t kmsfs`. No mount.fuse.kmsfs: fstab's
    // fuse.kmsfs must go through mount.fuse3.
    for name in ["kmsd", "kmsctl", "kmsfs"] {
        let path = format!("usr/bin/{name}");
        let entry = files.get(&path).unwrap_or_else(|| panic!("{path} is not in the package"));
        assert_eq!(entry.mode, "-rwxr-xr-x", "{path}");
        let elf = std::fs::read(at(&path)).expect("read binary");
        assert_eq!(elf[..4], *b"\x7fELF", "{path} is not an ELF binary");
    }
    let helper = files.get("sbin/mount.kmsfs").expect("sbin/mount.kmsfs is not in the package");
    assert_eq!(helper.link.as_deref(), Some("/usr/bin/kmsfs"), "sbin/mount.kmsfs: {helper:?}");
    assert!(!files.keys().any(|p| p.contains("mount.fuse")), "a mount.fuse helper would bypass mount.fuse3");
    // Stripped, their debug information in the -dbgsym package beside this one.
    let sections = run("readelf", &["--section-headers", "--wide", at("usr/bin/kmsd").to_str().expect("utf-8")]);
    assert!(!sections.contains(".debug_info"), "usr/bin/kmsd is not stripped");
    let name = deb.file_name().and_then(|n| n.to_str()).expect("file name");
    let dbgsym = deb.with_file_name(name.replacen("kmsfs_", "kmsfs-dbgsym_", 1).replace(".deb", ".ddeb"));
    assert!(dbgsym.is_file(), "no {} beside the package", dbgsym.display());

    // The units: the repository's, with ExecStart= on /usr/bin, and nothing else changed.
    // The drop-ins are examples in the documentation, not active.
    for unit in ["kmsd.socket", "kmsd.service", "kmsfs@.service"] {
        let path = format!("usr/lib/systemd/system/{unit}");
        assert_eq!(files.get(&path).map(|e| e.mode.as_str()), Some("-rw-r--r--"), "{path}");
        let text = std::fs::read_to_string(at(&path)).expect("read unit");
        assert_eq!(text, packaged_unit(unit), "{path} is not systemd/{unit} with /usr/bin");
        assert!(!text.contains("/usr/local"), "{path} names /usr/local");
    }
    assert!(packaged_unit("kmsd.service").contains("ExecStart=/usr/bin/kmsd "), "kmsd.service runs /usr/bin/kmsd");
    assert!(packaged_unit("kmsfs@.service").contains("/usr/bin/kmsfs mount "), "kmsfs@ runs /usr/bin/kmsfs");
    let unit_files: Vec<&String> = files.keys().filter(|p| p.starts_with("usr/lib/systemd/")).collect();
    assert_eq!(unit_files.len(), 3, "unexpected files in usr/lib/systemd: {unit_files:?}");
    let drop_ins = drop_ins();
    assert!(drop_ins.contains(&"tpm2.conf".to_string()), "{drop_ins:?}");
    for name in &drop_ins {
        let path = format!("usr/share/doc/kmsfs/examples/kmsd.service.d/{name}");
        let text = std::fs::read_to_string(at(&path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(text, packaged_unit(&format!("kmsd.service.d/{name}")), "{path}");
    }

    // The kmsadmin group and /etc/kmsd.
    let sysusers = std::fs::read_to_string(at("usr/lib/sysusers.d/kmsfs.conf")).expect("sysusers.d/kmsfs.conf");
    assert!(sysusers.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["g", "kmsadmin", "-", "-"]));
    let tmpfiles = std::fs::read_to_string(at("usr/lib/tmpfiles.d/kmsfs.conf")).expect("tmpfiles.d/kmsfs.conf");
    let lines: Vec<Vec<&str>> = tmpfiles.lines().map(|l| l.split_whitespace().collect()).collect();
    assert!(lines.contains(&vec!["d", "/etc/kmsd", "0750", "root", "kmsadmin", "-"]), "{tmpfiles}");

    // Man pages: exactly what each packaged binary's `--generate man` writes, compressed,
    // in the section of its name; mount.kmsfs(8) is kmsfs(1).
    let mut pages = BTreeSet::new();
    for name in ["kmsd", "kmsctl", "kmsfs"] {
        let generated = generated_pages(&at(&format!("usr/bin/{name}")));
        assert!(generated.len() > 1, "{name} --generate man wrote {generated:?}");
        for (page, roff) in generated {
            let section = page.rsplit('.').next().expect("section");
            let path = format!("usr/share/man/man{section}/{page}.gz");
            assert_eq!(files.get(&path).map(|e| e.mode.as_str()), Some("-rw-r--r--"), "{path}");
            assert!(gunzip(&at(&path)) == roff, "{path} is not what {name} --generate man writes");
            pages.insert(path);
        }
    }
    for (path, expected) in [("usr/share/man/man8/kmsd.8.gz", true), ("usr/share/man/man1/kmsctl.1.gz", true)] {
        assert_eq!(pages.contains(path), expected, "{path}");
    }
    let shipped: BTreeSet<String> =
        files.keys().filter(|p| p.starts_with("usr/share/man/") && files[*p].link.is_none()).cloned().collect();
    assert_eq!(shipped, pages, "man pages in the package that no binary generates, or the reverse");
    let alias = files.get("usr/share/man/man8/mount.kmsfs.8.gz").expect("mount.kmsfs(8)");
    assert_eq!(alias.link.as_deref(), Some("../man1/kmsfs.1.gz"));

    // Completions: what each packaged binary generates, where each shell looks.
    for name in ["kmsd", "kmsctl", "kmsfs"] {
        let binary = at(&format!("usr/bin/{name}"));
        for (kind, path) in [
            ("complete-bash", format!("usr/share/bash-completion/completions/{name}")),
            ("complete-zsh", format!("usr/share/zsh/vendor-completions/_{name}")),
            ("complete-fish", format!("usr/share/fish/vendor_completions.d/{name}.fish")),
        ] {
            assert_eq!(files.get(&path).map(|e| e.mode.as_str()), Some("-rw-r--r--"), "{path}");
            let script = std::fs::read_to_string(at(&path)).expect("read completion");
            assert!(!script.is_empty(), "{path} is empty");
            assert_eq!(script, run(binary.to_str().expect("utf-8"), &["--generate", kind]), "{path}");
        }
    }

    // Documentation Debian asks for.
    for path in ["copyright", "changelog.Debian.gz", "README.Debian", "README.md"] {
        assert!(files.contains_key(&format!("usr/share/doc/kmsfs/{path}")), "usr/share/doc/kmsfs/{path}");
    }
    let copyright = std::fs::read_to_string(at("usr/share/doc/kmsfs/copyright")).expect("copyright");
    assert!(copyright.starts_with("Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/"));
    assert!(copyright.contains("License: Apache-2.0"), "{copyright}");

    // Control: name, version, architecture, dependencies.
    let field = |name: &str| run("dpkg-deb", &["--field", deb.to_str().expect("utf-8"), name]).trim().to_string();
    assert_eq!(field("Package"), "kmsfs");
    assert_eq!(field("Version"), format!("{}-1", env!("CARGO_PKG_VERSION")));
    assert_eq!(field("Architecture"), run("dpkg", &["--print-architecture"]).trim());
    let depends = field("Depends");
    let depended: BTreeSet<&str> =
        depends.split([',', '|']).map(|d| d.split_whitespace().next().unwrap_or_default()).collect();
    for needed in ["fuse3", "libtss2-tcti-device0", "systemd", "libc6"] {
        assert!(depended.contains(needed), "Depends lacks {needed}: {depends}");
    }
    // Every shared library a binary links is some dependency's (libgcc_s is libc6's own
    // dependency, which cargo-deb leaves to it).
    for name in ["kmsd", "kmsctl", "kmsfs"] {
        let dynamic = run("readelf", &["--dynamic", at(&format!("usr/bin/{name}")).to_str().expect("utf-8")]);
        for lib in dynamic.lines().filter(|l| l.contains("(NEEDED)")).filter_map(|l| l.split('[').nth(1)) {
            let lib = lib.trim_end_matches(']');
            if lib.starts_with("libgcc_s") || lib.starts_with("ld-linux") {
                continue;
            }
            // `PACKAGE[:ARCH]: PATH`, one line per package shipping it (libc6-i386 has a libm too).
            let search = run("dpkg", &["--search", &format!("*/{lib}")]);
            let owners: Vec<&str> = search.lines().filter_map(|l| l.split(':').next()).map(str::trim).collect();
            assert!(
                owners.iter().any(|o| depended.contains(o)),
                "{name} links {lib}, from {owners:?}, none of which is in Depends: {depends}"
            );
        }
    }

    // Maintainer scripts: valid sh, executable, the systemd part generated into each.
    let control = tempfile::Builder::new().prefix("kmsfs-control-").tempdir().expect("tempdir");
    run("dpkg-deb", &["--control", deb.to_str().expect("utf-8"), control.path().to_str().expect("utf-8")]);
    for (script, generated) in [
        ("postinst", "systemd-sysusers"),
        ("prerm", "deb-systemd-invoke stop kmsd.service kmsd.socket"),
        ("postrm", "deb-systemd-helper purge kmsd.service kmsd.socket"),
    ] {
        let path = control.path().join(script);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{script}: {e}"));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777, 0o755, "{script}");
        assert!(text.contains(generated), "{script} lacks the generated part ({generated})");
        assert!(!text.contains("#DEBHELPER#"), "{script} still has the debhelper token");
        run("sh", &["-n", path.to_str().expect("utf-8")]);
    }
}

#[test]
fn lintian_reports_no_error_or_warning() {
    let deb = package();
    let present = Command::new("sh").args(["-c", "command -v lintian"]).output().is_ok_and(|o| o.status.success());
    assert!(present, "lintian is missing: apt-get install lintian (scripts/install-test-deps does)");
    // Info and pedantic tags too, so that the test's output is the whole report.
    let out = Command::new("lintian")
        .args(["--display-info", "--pedantic", "--show-overrides", "--tag-display-limit", "0"])
        .arg(&deb)
        .output()
        .expect("run lintian");
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!("lintian {}:\n{report}{}", deb.display(), String::from_utf8_lossy(&out.stderr));
    let bad: Vec<&str> = report.lines().filter(|l| l.starts_with("E: ") || l.starts_with("W: ")).collect();
    assert!(bad.is_empty(), "lintian found errors or warnings:\n{}", bad.join("\n"));
    assert!(out.status.success(), "lintian failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
}

/// Where the container's shell finds each of the package's commands, one per line.
const WHICH: &str = "for b in kmsd kmsctl kmsfs; do command -v $b || true; done";

/// The key ID of a `kmsctl create-key` reply.
fn key_id(reply: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(reply).unwrap_or_else(|e| panic!("create-key: {e}: {reply}"));
    v["KeyMetadata"]["KeyId"].as_str().expect("KeyId").to_string()
}

/// Unit files (and enablement symlinks, drop-ins, masks) named kmsd* or kmsfs* in systemd's
/// system directories, and the units systemd knows by those names, in the container
/// (`systemctl list-unit-files` fails when it lists none).
fn units_left(c: &Container) -> String {
    c.ok("find /usr/lib/systemd /lib/systemd /etc/systemd /run/systemd/system \
         \\( -name 'kmsd*' -o -name 'kmsfs*' \\) 2>/dev/null | sort; \
         systemctl list-unit-files --no-legend 'kmsd*' 'kmsfs*' || true")
}

#[test]
fn installs_serves_upgrades_and_purges_in_a_booted_container() {
    let deb = package();
    let Some(mut c) = Container::new() else { return };
    // The harness installs the workspace's units (copied into /etc/systemd/system) and
    // binaries (bound onto /usr/local/bin at boot) as the README's manual installation does;
    // this machine gets the package alone, so both go before anything else happens.
    for unit in ["kmsd.socket", "kmsd.service", "kmsfs@.service"] {
        let path = c.path(&format!("/etc/systemd/system/{unit}"));
        if path.exists() {
            std::fs::remove_file(&path).expect("remove the harness's unit");
        }
    }
    std::fs::copy(&deb, c.path("/root/kmsfs.deb")).expect("copy the package into the container");
    let state = c.boot();
    assert_eq!(state, "running", "boot: {}", c.sh("systemctl --failed --no-legend").stdout);
    c.ok("for b in kmsd kmsctl kmsfs; do umount /usr/local/bin/$b 2>/dev/null || true; rm -f /usr/local/bin/$b; done");
    let before = c.sh(WHICH);
    assert!(before.stdout.trim().is_empty(), "kmsfs's binaries before the package: {}", before.stdout);
    assert_eq!(units_left(&c).trim(), "", "kmsfs's units before the package");

    // Installed: nothing enabled or started, the group and the configuration directory made.
    let installed = c.ok("dpkg -i /root/kmsfs.deb 2>&1");
    assert!(installed.contains("systemctl enable --now kmsd.socket"), "dpkg -i said:\n{installed}");
    assert_eq!(c.ok(WHICH), "/usr/bin/kmsd\n/usr/bin/kmsctl\n/usr/bin/kmsfs\n");
    assert!(c.ok("getent group kmsadmin").starts_with("kmsadmin:x:"));
    assert_eq!(c.ok("stat -c '%a %U %G' /etc/kmsd /etc/kmsfs"), "750 root kmsadmin\n755 root root\n");
    assert_eq!(c.sh("systemctl is-enabled kmsd.socket").stdout.trim(), "disabled");
    assert_eq!(c.is_active("kmsd.socket"), "inactive");
    let exec_start = c.ok("systemctl show --property ExecStart --value kmsd.service");
    assert!(exec_start.contains("path=/usr/bin/kmsd "), "kmsd.service's ExecStart: {exec_start}");
    // The package ships no md5sums (cargo-deb makes none); dpkg made them at unpacking.
    let verify = c.sh("dpkg --verify kmsfs && test -s /var/lib/dpkg/info/kmsfs.md5sums");
    assert!(verify.success() && verify.stdout.is_empty(), "dpkg --verify kmsfs: {verify:?}");

    // The administrator's policy, then the agent as README.Debian says.
    c.write("/etc/kmsd/policies/users/root.json", ROOT_USES_EVERYTHING);
    c.ok("systemctl enable --now kmsd.socket");
    assert_eq!(c.is_active("kmsd.socket"), "active");
    assert_eq!(c.is_active("kmsd.service"), "inactive", "kmsd started before anyone asked");
    let keys: serde_json::Value = serde_json::from_str(&c.ok("kmsctl list-keys")).expect("list-keys JSON");
    assert!(keys["Keys"].is_array(), "{keys}");
    assert_eq!(c.is_active("kmsd.service"), "active", "kmsctl list-keys did not start kmsd");
    assert!(c.ok("kmsfs --version").contains(env!("CARGO_PKG_VERSION")));
    assert!(c.ok("kmsd --version").contains(env!("CARGO_PKG_VERSION")));

    // The man pages render where man looks, and the bash completion loads.
    let man = c.ok("MANWIDTH=80 man kmsctl 2>&1");
    assert!(man.contains("list-keys") && man.contains("kmsctl"), "man kmsctl:\n{man}");
    let complete = c.ok("bash -c '. /usr/share/bash-completion/completions/kmsctl && complete -p kmsctl'");
    assert!(complete.contains("kmsctl"), "{complete}");

    // A volume mounted through both helpers: mount -t kmsfs (/sbin/mount.kmsfs) and fstab's
    // fuse.kmsfs (mount.fuse3, which runs kmsfs from PATH).
    let key = key_id(&c.ok("kmsctl create-key --description 'packaged'"));
    c.ok(&format!("mkdir -p /srv/.vault.kmsfs /srv/vault && kmsfs init /srv/.vault.kmsfs --key-id {key}"));
    c.ok("mount -t kmsfs /srv/.vault.kmsfs /srv/vault");
    let mounted = c.ok("findmnt --noheadings --output SOURCE,FSTYPE /srv/vault");
    assert!(mounted.starts_with("/srv/.vault.kmsfs fuse"), "mount -t kmsfs mounted {mounted}");
    c.ok("echo through-mount.kmsfs > /srv/vault/note && umount /srv/vault");
    c.ok("mount -t fuse.kmsfs /srv/.vault.kmsfs /srv/vault");
    assert_eq!(c.ok("cat /srv/vault/note"), "through-mount.kmsfs\n");
    c.ok("umount /srv/vault");

    // Installed again over itself, as an upgrade is: the running agent is restarted on the
    // package's binary, still enabled, with its keys.
    let pid = c.ok("systemctl show --property MainPID --value kmsd.service");
    c.ok("dpkg -i /root/kmsfs.deb");
    assert_eq!(c.is_active("kmsd.service"), "active", "kmsd after the upgrade");
    assert_ne!(c.ok("systemctl show --property MainPID --value kmsd.service"), pid, "kmsd was not restarted");
    assert_eq!(c.sh("systemctl is-enabled kmsd.socket").stdout.trim(), "enabled");
    assert!(c.ok("kmsctl list-keys").contains(&key), "the key after the upgrade");

    // What the administrator adds that the package's purge must clean up: an enabled kmsfs@
    // instance and a drop-in.
    c.ok("printf 'CIPHERDIR=/srv/.vault.kmsfs\\nOPTIONS=allow_other\\n' > /etc/kmsfs/srv-vault.conf");
    c.ok("systemctl enable kmsfs@srv-vault.service");
    c.ok("mkdir -p /etc/systemd/system/kmsd.service.d && \
          cp /usr/share/doc/kmsfs/examples/kmsd.service.d/tpm2.conf /etc/systemd/system/kmsd.service.d/ && \
          systemctl daemon-reload");

    // Removed, with a volume still mounted: the agent stopped (with a warning naming the
    // mount, which stays), the programs gone, the key store and configuration kept.
    c.ok("mount -t kmsfs /srv/.vault.kmsfs /srv/vault");
    let removed = c.ok("dpkg --remove kmsfs 2>&1");
    assert!(
        removed.contains("volumes are still mounted") && removed.contains("/srv/vault"),
        "dpkg --remove said:\n{removed}"
    );
    c.ok("umount /srv/vault");
    assert_eq!(c.is_active("kmsd.service"), "inactive");
    assert_eq!(c.is_active("kmsd.socket"), "inactive");
    assert!(c.sh(WHICH).stdout.trim().is_empty(), "binaries left after removal");
    c.ok("test -s /var/lib/kmsd/kmsd.db && test -s /etc/kmsd/policies/users/root.json");

    // Purged: no unit, enablement or drop-in left, and the key store still kept, and said so.
    let purged = c.ok("dpkg --purge kmsfs 2>&1");
    assert!(purged.contains("kept /var/lib/kmsd") && purged.contains("kept /etc/kmsd"), "dpkg --purge said:\n{purged}");
    c.ok("systemctl daemon-reload");
    assert_eq!(units_left(&c).trim(), "", "units left behind by the purge");
    assert!(!c.sh("dpkg-query --show kmsfs").success(), "dpkg still knows kmsfs after the purge");
    c.ok("test -s /var/lib/kmsd/kmsd.db && test -s /etc/kmsd/policies/users/root.json && test -s /etc/kmsfs/srv-vault.conf");
    assert!(c.ok("getent group kmsadmin").starts_with("kmsadmin:"), "the kmsadmin group stays");
}
