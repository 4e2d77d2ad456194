//! The runner `config.toml` in docs/gitlab-autoscaling.md is valid TOML and uses GitLab
//! Runner's key names for VM isolation, with a nesting_config the server accepts.

use std::path::Path;

/// Every ```toml block of the document, in order.
fn toml_blocks(doc: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in doc.lines() {
        match (&mut current, line.trim()) {
            (None, "```toml") => current = Some(String::new()),
            (Some(_), "```") => blocks.extend(current.take()),
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

fn keys(t: &toml::Value) -> Vec<&str> {
    let mut k: Vec<&str> = t
        .as_table()
        .expect("a table")
        .keys()
        .map(String::as_str)
        .collect();
    k.sort_unstable();
    k
}

#[test]
fn nesting_docs_runner_config_uses_the_runners_keys() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/gitlab-autoscaling.md");
    let doc = std::fs::read_to_string(&path).expect("docs/gitlab-autoscaling.md");
    let blocks = toml_blocks(&doc);
    assert!(blocks.len() >= 2, "a runner config and a server config");
    let config: toml::Value = toml::from_str(&blocks[0]).expect("the runner config parses");
    let runner = &config["runners"][0];
    assert_eq!(runner["executor"].as_str(), Some("instance"));
    let scaler = &runner["autoscaler"];
    assert!(scaler["plugin"].is_str());
    let capacity = scaler["capacity_per_instance"].as_integer().unwrap();
    assert!(capacity >= 1);
    assert!(scaler["connector_config"]["username"].is_str());
    assert!(scaler["policy"].as_array().is_some_and(|p| !p.is_empty()));

    for key in keys(scaler) {
        assert!(
            [
                "capacity_per_instance",
                "max_use_count",
                "max_instances",
                "plugin",
                "plugin_config",
                "connector_config",
                "policy",
                "instance_ready_command",
                "vm_isolation",
            ]
            .contains(&key),
            "autoscaler.{key} is not a runner key the example should use"
        );
    }
    // The keys of the runner's VMIsolation struct, and of its SSH connector config.
    let iso = &scaler["vm_isolation"];
    for key in keys(iso) {
        assert!(
            [
                "connector_config",
                "enabled",
                "image",
                "nesting_config",
                "nesting_host"
            ]
            .contains(&key),
            "vm_isolation.{key} is not a runner key"
        );
    }
    assert_eq!(iso["enabled"].as_bool(), Some(true));
    assert_eq!(
        iso["nesting_host"].as_str(),
        Some("unix:///run/kiln/nesting.sock")
    );
    let connector = &iso["connector_config"];
    for key in keys(connector) {
        assert!(
            [
                "os",
                "arch",
                "protocol",
                "protocol_port",
                "username",
                "password",
                "key_path",
                "use_static_credentials",
                "keepalive",
                "timeout",
                "use_external_addr",
            ]
            .contains(&key),
            "connector_config.{key} is not a runner key"
        );
    }
    // The server's nesting_config keys, with the login the runner will use.
    let nesting = &iso["nesting_config"];
    for key in keys(nesting) {
        assert!(
            ["ssh_user", "ssh_password", "memory_mib", "vcpus"].contains(&key),
            "nesting_config.{key} is not a server key"
        );
    }
    assert_eq!(nesting["ssh_user"], connector["username"]);
    assert_eq!(nesting["ssh_password"], connector["password"]);
    // The server's config parses as TOML; kiln-gitlab's unit tests check its keys.
    let server: toml::Value = toml::from_str(&blocks[1]).expect("the server config parses");
    assert!(
        server["slots"].as_integer().unwrap() >= capacity,
        "slots >= capacity_per_instance"
    );
}
