//! The README's main command, `tandem-lab demo`, end to end: a two-site lab on loopback
//! that protects, checkpoints, tests a failover, survives kills and a link cut, moves with
//! reverse protection and back, and fails over after the protected site is lost. Every
//! step must pass.

use std::process::Command;

use tandem_testkit::process::binary;

#[test]
fn the_demo_passes_every_step() {
    let out = Command::new(binary("tandem-lab"))
        .arg("demo")
        .output()
        .expect("running tandem-lab demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && stdout.contains("all steps passed")
            && stdout.contains("joined with a one-time join token"),
        "tandem-lab demo failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}
