//! The `xpud` command line: plugin check and pack, help, and bad configuration.

use std::process::{Command, Output};

use crate::support::*;

fn xpud(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xpud"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run xpud")
}

fn pack(template: &std::path::Path, wasm: &std::path::Path, out: &std::path::Path) -> Output {
    xpud(&[
        "plugin",
        "pack",
        "--manifest",
        template.to_str().unwrap(),
        "--wasm",
        wasm.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ])
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn plugin_check_describes_a_good_plugin_and_refuses_bad_ones() {
    let (wasm, _) = built("sim-xpu");
    let out = xpud(&["plugin", "check", wasm.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("world:    Driver (xpu:plugin@0.2.0)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("export:   xpu:plugin/driver@0.2.0"),
        "{stdout}"
    );
    assert!(stdout.contains("links:    ok"), "{stdout}");
    assert!(
        stdout.contains("exports:  ok (xpu:plugin/driver matches the contract)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("manifest:") && stdout.contains(" ok"),
        "{stdout}"
    );

    // The same wasm beside a manifest pinning another hash.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("sim-xpu.wasm");
    std::fs::copy(&wasm, &copy).unwrap();
    std::fs::write(
        dir.path().join("sim-xpu.toml"),
        "name = \"sim-xpu\"\nversion = \"0.1.0\"\nkind = \"driver\"\napi = \"0.2.0\"\n\
         sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"\n",
    )
    .unwrap();
    let out = xpud(&["plugin", "check", copy.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("pins sha256"),
        "{}",
        text(&out.stderr)
    );

    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"not wasm").unwrap();
    let out = xpud(&["plugin", "check", junk.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("not a valid WebAssembly component"));
}

#[test]
fn plugin_pack_pins_the_hash_and_writes_nothing_on_a_bad_template() {
    let (wasm, _) = built("passthrough");
    let template = repo().join("plugins/passthrough/plugin.toml");
    let out_dir = tempfile::tempdir().unwrap();
    let out = pack(&template, &wasm, out_dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let manifest = xpud::plugins::Manifest::read(&out_dir.path().join("passthrough.toml")).unwrap();
    use sha2::Digest;
    let bytes = std::fs::read(out_dir.path().join("passthrough.wasm")).unwrap();
    assert_eq!(manifest.sha256, hex::encode(sha2::Sha256::digest(&bytes)));

    let bad = out_dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "name = \"bad\"\nversion = \"0.1.0\"\nkind = \"gpu\"\napi = \"0.1.0\"\n",
    )
    .unwrap();
    let empty = tempfile::tempdir().unwrap();
    let out = pack(&bad, &wasm, empty.path());
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("kind"), "{}", text(&out.stderr));
    assert_eq!(std::fs::read_dir(empty.path()).unwrap().count(), 0);
}

#[test]
fn help_everywhere_and_bad_config_names_the_key() {
    for args in [
        &["--help"][..],
        &["serve", "--help"],
        &["plugin", "--help"],
        &["plugin", "check", "--help"],
        &["plugin", "pack", "--help"],
    ] {
        let out = xpud(args);
        assert!(out.status.success(), "{args:?}");
        assert!(text(&out.stdout).contains("Usage"), "{args:?}");
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("xpud.toml");
    std::fs::write(
        &config,
        "listen = \"127.0.0.1:0\"\n[sampler]\ninterval-ms = \"often\"\n",
    )
    .unwrap();
    let out = xpud(&["serve", "--config", config.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("interval-ms"), "{stderr}");
}

#[test]
fn the_example_config_parses_to_the_embedded_defaults() {
    let example = xpud::config::ServeConfig::from_file(&repo().join("examples/xpud.toml")).unwrap();
    let defaults = xpud::config::ServeConfig::default();
    // Values, not Debug text: a hand-written Debug (the platform password's is
    // redacted) could leave a key out and let it drift.
    assert_eq!(example, defaults);
}

#[test]
fn output_cut_short_by_its_reader_is_not_a_crash() {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_xpud"))
        .arg("openapi")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run xpud");
    // Read a little, then hang up, as `xpud openapi | head -c 16` does.
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 16];
    stdout.read_exact(&mut first).unwrap();
    drop(stdout);
    let out = child.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn plugin_check_refuses_an_export_with_the_contracts_name_but_not_its_signature() {
    let (wasm, _) = built("misfit");
    let out = xpud(&["plugin", "check", wasm.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stdout}");
    // It links (its imports are provided), and that is not enough.
    assert!(stdout.contains("links:    ok"), "{stdout}");
    assert!(!stdout.contains("exports:  ok"), "{stdout}");
    assert!(
        stderr.contains("xpu:plugin/driver export does not match the contract"),
        "{stderr}"
    );
}

/// `xpud plugin probe` loads a driver as the server would and prints what it
/// reports; with `--partition`, a partition round trip. A driver that does not load
/// is an error with the reason.
#[test]
fn plugin_probe_prints_what_a_driver_reports() {
    let plugins = PluginDir::new();
    plugins.install("sim-xpu");
    let dir = plugins.path().to_str().unwrap();
    let out = xpud(&[
        "plugin",
        "probe",
        "--plugin-dir",
        dir,
        "sim-xpu",
        "--partition",
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert_eq!(stdout.matches("device:   ").count(), 2, "{stdout}");
    assert_eq!(stdout.matches("card:     ").count(), 2, "{stdout}");
    assert!(
        stdout.contains("models:   in xpud's process, on the card"),
        "{stdout}"
    );
    assert!(
        stdout.contains("label:    xpu.model=SIMULATED_XPU16"),
        "{stdout}"
    );
    assert!(stdout.contains("made:     Partition"), "{stdout}");
    assert!(stdout.contains("left:     0 partitions"), "{stdout}");
    // Over NVML (here the stand-in: a T4, and an A100 in MIG mode), it also says
    // where models placed on each card would run; a time slice of the T4 has a
    // worker of its own, shown the card.
    if let Ok(library) = fake_nvml() {
        plugins.install("nvidia");
        let out = xpud(&[
            "plugin",
            "probe",
            "--plugin-dir",
            dir,
            "nvidia",
            "--nvml-library",
            library.to_str().unwrap(),
            "--partition",
            "--bind-pid",
            "4242",
        ]);
        let stdout = text(&out.stdout);
        assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
        assert!(
            stdout.contains("cuda:     card 0 -> CUDA device 0"),
            "{stdout}"
        );
        assert!(
            stdout.contains("cuda:     card 1 -> none: in MIG mode"),
            "{stdout}"
        );
        assert!(
            stdout.contains(
                "models:   in a worker shown GPU-8a8b7d6e-3a0f-4c2b-9e1d-5f4a3b2c1d0e alone"
            ),
            "{stdout}"
        );
        // The stand-in lists process 4242 on the T4 with 512 MiB: the slice's own.
        assert!(
            stdout.contains("bound:    process 4242 does the partition's work"),
            "{stdout}"
        );
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with("instance: ") && l.contains("memory-used-mib: Some(512)")),
            "{stdout}"
        );
    }
    let out = xpud(&["plugin", "probe", "--plugin-dir", dir, "nothing-here"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("driver nothing-here did not load: no nothing-here.toml"),
        "{}",
        text(&out.stderr)
    );
}
