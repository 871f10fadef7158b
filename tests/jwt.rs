//! JWT-SVIDs end to end: the real `writ` binary, the Rust `spiffe` crate as
//! an independent client and offline validator, tokens forged with real keys
//! (writ's own, read from its state directory), and bound task processes.

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::{Writ, helper_command};
use serde_json::{Map, Value, json};
use spiffe::{JwtSource, JwtSvid};
use tonic::Code;
use writ::jwt::JwtSigningKey;
use writ::proto::admin as apb;
use writ::proto::workload as pb;
use writ::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;

const ORCH_ID: &str = "spiffe://writ.test/orchestrator";
const SECOND_ID: &str = "spiffe://writ.test/second";

fn config(extra: &str) -> String {
    let uid = nix::unistd::geteuid().as_raw();
    format!(
        r#"
[admin_api]
authorized = [["unix:uid:{uid}"]]

[tasks]
max_ttl = "1h"
default_ttl = "10m"
max_depth = 3

{extra}

[[entry]]
spiffe_id = "{ORCH_ID}"
selectors = ["unix:uid:{uid}"]
"#
    )
}

async fn client(writ: &Writ) -> SpiffeWorkloadApiClient<tonic::transport::Channel> {
    SpiffeWorkloadApiClient::new(writ::cli::client::connect(&writ.socket).await.unwrap())
}

fn with_header<T>(m: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    r
}

async fn fetch_jwt(
    writ: &Writ,
    audience: &[&str],
    spiffe_id: &str,
) -> Result<pb::JwtsvidResponse, tonic::Status> {
    client(writ)
        .await
        .fetch_jwtsvid(with_header(pb::JwtsvidRequest {
            audience: audience.iter().map(|a| a.to_string()).collect(),
            spiffe_id: spiffe_id.into(),
        }))
        .await
        .map(|r| r.into_inner())
}

async fn validate(
    writ: &Writ,
    token: &str,
    audience: &str,
) -> Result<pb::ValidateJwtsvidResponse, tonic::Status> {
    client(writ)
        .await
        .validate_jwtsvid(with_header(pb::ValidateJwtsvidRequest {
            audience: audience.into(),
            svid: token.into(),
        }))
        .await
        .map(|r| r.into_inner())
}

/// Asserts that ValidateJWTSVID refuses `token` as InvalidArgument with a
/// message containing `reason`.
async fn assert_refused(writ: &Writ, case: &str, token: &str, audience: &str, reason: &str) {
    let err = validate(writ, token, audience)
        .await
        .expect_err(&format!("{case}: accepted"));
    assert_eq!(err.code(), Code::InvalidArgument, "{case}: {err:?}");
    assert!(
        err.message().contains(reason),
        "{case}: {:?} lacks {reason:?}",
        err.message()
    );
}

fn claims_of(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

fn header_of(token: &str) -> Value {
    let header = token.split('.').next().unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap()
}

/// writ's active JWT signing key, read from its state directory: a test
/// with the agent's own key can forge tokens that fail for exactly one
/// reason (expired, wrong trust domain, ...).
fn writs_active_key(writ: &Writ) -> JwtSigningKey {
    let dir = writ.dir.path().join("state/ca");
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("state.json")).unwrap()).unwrap();
    let key = state["jwt_authorities"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["role"] == "active")
        .unwrap();
    let pem_text = std::fs::read_to_string(dir.join(key["key_file"].as_str().unwrap())).unwrap();
    let der = pem::parse(pem_text).unwrap().into_contents();
    JwtSigningKey::from_pkcs8(key["key_id"].as_str().unwrap(), &der).unwrap()
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn spiffe_crate_fetches_a_token_and_validates_it_offline() {
    let writ = Writ::start(&config(""));
    let source = JwtSource::builder()
        .endpoint(writ.endpoint())
        .build()
        .await
        .expect("JwtSource against writ");
    let svid = source.fetch_jwt_svid(["tool-api"]).await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), ORCH_ID);

    // Offline: only the bundle writ streamed, and the crate's own verifier.
    let bundles = source.bundle_set().unwrap();
    let validated = JwtSvid::parse_and_validate(svid.token(), &*bundles, &["tool-api"]).unwrap();
    assert_eq!(validated.spiffe_id().to_string(), ORCH_ID);
    assert!(JwtSvid::parse_and_validate(svid.token(), &*bundles, &["other-api"]).is_err());
    let bundle = bundles
        .get(&spiffe::TrustDomain::new("writ.test").unwrap())
        .expect("a JWT bundle for writ.test");
    assert!(bundle.find_jwt_authority(svid.key_id()).is_some());

    // The same token through ValidateJWTSVID.
    let valid = validate(&writ, svid.token(), "tool-api").await.unwrap();
    assert_eq!(valid.spiffe_id, ORCH_ID);
    let claims = valid.claims.unwrap();
    use prost_types::value::Kind;
    assert_eq!(
        claims.fields["aud"].kind,
        Some(Kind::StringValue("tool-api".into()))
    );
    assert_eq!(
        claims.fields["sub"].kind,
        Some(Kind::StringValue(ORCH_ID.into()))
    );
    source.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fetch_jwt_svid_follows_the_workload_api_rules() {
    let uid = nix::unistd::geteuid().as_raw();
    let writ = Writ::start(&config(&format!(
        "[ca]\njwt_svid_ttl = \"2m\"\n\n[[entry]]\nspiffe_id = \"{SECOND_ID}\"\nselectors = [\"unix:uid:{uid}\"]\nhint = \"backup\"\n"
    )));
    let err = fetch_jwt(&writ, &[], "").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(err.message(), "audience is required");
    let err = fetch_jwt(&writ, &["a", ""], "").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = fetch_jwt(&writ, &["a"], "not-an-id").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = fetch_jwt(&writ, &["a"], "spiffe://writ.test/someone-else")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // One token per identity, in entry order (the config lists the second
    // entry first), hints passed through.
    let all = fetch_jwt(&writ, &["a", "b"], "").await.unwrap();
    let ids: Vec<&str> = all.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
    assert_eq!(ids, vec![SECOND_ID, ORCH_ID]);
    assert_eq!(all.svids[0].hint, "backup");
    assert_eq!(all.svids[1].hint, "");
    for svid in &all.svids {
        let claims = claims_of(&svid.svid);
        assert_eq!(claims["sub"], svid.spiffe_id.as_str());
        assert_eq!(claims["aud"], json!(["a", "b"]));
        let lifetime = claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap();
        assert_eq!(lifetime, 120, "ca.jwt_svid_ttl is honoured");
        assert!(claims["jti"].as_str().is_some_and(|j| !j.is_empty()));
        assert!(claims.get("task").is_none());
        let header = header_of(&svid.svid);
        assert_eq!(header["alg"], "ES256");
        assert_eq!(header["typ"], "JWT");
    }
    assert_ne!(
        claims_of(&all.svids[0].svid)["jti"],
        claims_of(&all.svids[1].svid)["jti"]
    );

    // spiffe_id selects exactly one.
    let one = fetch_jwt(&writ, &["a"], SECOND_ID).await.unwrap();
    assert_eq!(one.svids.len(), 1);
    assert_eq!(one.svids[0].spiffe_id, SECOND_ID);
    assert_eq!(claims_of(&one.svids[0].svid)["aud"], "a");

    // A repeated audience value is sent once: the token is the one asked
    // for without the repeat (the same one, as it is re-served).
    let repeated = fetch_jwt(&writ, &["a", "b", "a", "b"], SECOND_ID)
        .await
        .unwrap();
    assert_eq!(claims_of(&repeated.svids[0].svid)["aud"], json!(["a", "b"]));
    assert_eq!(repeated.svids[0].svid, all.svids[0].svid);

    // The CLI prints the same, and validates it.
    let socket = writ.socket.to_str().unwrap();
    let (ok, stdout, stderr) = common::writ_cli(
        &[
            "api",
            "fetch",
            "jwt",
            "--audience",
            "cli",
            "--spiffe-id",
            SECOND_ID,
            "--socket",
            socket,
            "--output",
            "json",
        ],
        None,
    );
    assert!(ok, "{stderr}");
    let printed: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(printed[0]["spiffe_id"], SECOND_ID);
    assert_eq!(printed[0]["claims"]["aud"], "cli");
    let token = printed[0]["svid"].as_str().unwrap().to_owned();
    let (ok, stdout, stderr) = common::writ_cli(
        &[
            "api",
            "validate",
            "jwt",
            "--audience",
            "cli",
            "--svid",
            &token,
            "--socket",
            socket,
        ],
        None,
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains(SECOND_ID), "{stdout}");
    let (ok, _, stderr) = common::writ_cli(
        &[
            "api",
            "validate",
            "jwt",
            "--audience",
            "other",
            "--svid",
            &token,
            "--socket",
            socket,
        ],
        None,
    );
    assert!(!ok && stderr.contains("not in the token's aud"), "{stderr}");
    let (ok, stdout, stderr) = common::writ_cli(
        &[
            "api",
            "fetch",
            "jwt-bundle",
            "--socket",
            socket,
            "--output",
            "json",
        ],
        None,
    );
    assert!(ok, "{stderr}");
    let bundles: Value = serde_json::from_str(&stdout).unwrap();
    let keys = bundles["spiffe://writ.test"]["keys"].as_array().unwrap();
    assert_eq!(keys[0]["use"], "jwt-svid");
    assert_eq!(keys[0]["kid"], header_of(&token)["kid"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn validation_refuses_bad_tokens_each_for_its_reason() {
    let writ = Writ::start(&config(""));
    let real = fetch_jwt(&writ, &["api"], "").await.unwrap().svids[0]
        .svid
        .clone();
    validate(&writ, &real, "api").await.unwrap();
    let key = writs_active_key(&writ);
    assert_eq!(
        header_of(&real)["kid"],
        key.key_id(),
        "read the signing key"
    );
    let kid = key.key_id().to_owned();
    let now = unix_now();
    let good_claims = json!({"sub": ORCH_ID, "aud": "api", "exp": now + 300, "iat": now});
    let b64 = |v: &Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap());

    // Forged with writ's own key, each failing for one reason only.
    let mut expired = object(good_claims.clone());
    expired.insert("exp".into(), (now - 3600).into());
    assert_refused(
        &writ,
        "expired",
        &key.sign(&expired).unwrap(),
        "api",
        "token has expired",
    )
    .await;
    let mut early = object(good_claims.clone());
    early.insert("nbf".into(), (now + 3600).into());
    early.insert("exp".into(), (now + 7200).into());
    assert_refused(
        &writ,
        "not yet valid",
        &key.sign(&early).unwrap(),
        "api",
        "not yet valid",
    )
    .await;
    // A subject in a trust domain whose bundle we do not hold: our key is
    // known only under writ.test, so it vouches for nothing elsewhere.
    let mut foreign = object(good_claims.clone());
    foreign.insert("sub".into(), "spiffe://other.test/agent".into());
    assert_refused(
        &writ,
        "key from another trust domain",
        &key.sign(&foreign).unwrap(),
        "api",
        "no JWT bundle for trust domain other.test",
    )
    .await;
    // A key writ never published.
    let stranger = JwtSigningKey::generate().unwrap();
    assert_refused(
        &writ,
        "unknown kid",
        &stranger.sign(&object(good_claims.clone())).unwrap(),
        "api",
        &format!("key ID \"{}\" is not in the JWT bundle", stranger.key_id()),
    )
    .await;

    // alg none, unsigned.
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "kid": kid, "typ": "JWT"})),
        b64(&good_claims)
    );
    assert_refused(
        &writ,
        "alg none",
        &none,
        "api",
        "algorithm \"none\" is not allowed",
    )
    .await;
    // HS256 keyed with writ's published public key bytes.
    let jwks = client(&writ)
        .await
        .fetch_jwt_bundles(with_header(pb::JwtBundlesRequest {}))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    let jwks: Value = serde_json::from_slice(&jwks.bundles["spiffe://writ.test"]).unwrap();
    let jwk = &jwks["keys"][0];
    let mut public = vec![0x04];
    for c in ["x", "y"] {
        public.extend(URL_SAFE_NO_PAD.decode(jwk[c].as_str().unwrap()).unwrap());
    }
    let input = format!(
        "{}.{}",
        b64(&json!({"alg": "HS256", "kid": kid, "typ": "JWT"})),
        b64(&good_claims)
    );
    let mac = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &public),
        input.as_bytes(),
    );
    let hs256 = format!("{input}.{}", URL_SAFE_NO_PAD.encode(mac.as_ref()));
    assert_refused(
        &writ,
        "HS256",
        &hs256,
        "api",
        "algorithm \"HS256\" is not allowed",
    )
    .await;

    // A real token: the wrong audience, and tampered parts.
    assert_refused(
        &writ,
        "wrong audience",
        &real,
        "other-api",
        "audience \"other-api\" is not in the token's aud claim",
    )
    .await;
    let parts: Vec<&str> = real.split('.').collect();
    let mut tampered_claims = claims_of(&real);
    tampered_claims["sub"] = "spiffe://writ.test/admin".into();
    let tampered = format!("{}.{}.{}", parts[0], b64(&tampered_claims), parts[2]);
    assert_refused(
        &writ,
        "tampered payload",
        &tampered,
        "api",
        "signature does not verify",
    )
    .await;
    let mut sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
    sig[20] ^= 0x80;
    let tampered = format!("{}.{}.{}", parts[0], parts[1], URL_SAFE_NO_PAD.encode(sig));
    assert_refused(
        &writ,
        "tampered signature",
        &tampered,
        "api",
        "signature does not verify",
    )
    .await;

    // Shape.
    let oversize = format!("{real}{}", "A".repeat(16 * 1024));
    assert_refused(&writ, "oversize", &oversize, "api", "token too large").await;
    assert_refused(
        &writ,
        "garbage",
        "this is not a token",
        "api",
        "malformed token",
    )
    .await;
    assert_refused(
        &writ,
        "two parts",
        &format!("{}.{}", parts[0], parts[1]),
        "api",
        "three base64url parts",
    )
    .await;

    // The request itself.
    let err = validate(&writ, &real, "").await.unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::InvalidArgument, "audience is required")
    );
    let err = validate(&writ, "", "api").await.unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::InvalidArgument, "svid is required")
    );
    // After all that, the real token is still fine.
    validate(&writ, &real, "api").await.unwrap();
}

/// A process to bind tasks to: re-runs this binary as a helper that waits
/// for a go-file, fetches JWT-SVIDs for `audience`, reports each as a line
/// `TOKEN <spiffe id> <token>`, then stays alive until killed (a task bound
/// to it would otherwise end with it).
struct TokenChild {
    child: Child,
    go: PathBuf,
    lines: mpsc::Receiver<String>,
}

impl TokenChild {
    fn spawn(writ: &Writ, name: &str, audience: &str) -> TokenChild {
        let go = writ.dir.path().join(format!("{name}.go"));
        let mut child = helper_command("jwt-child")
            .env("WRIT_SOCKET", &writ.socket)
            .env("WRIT_GO_FILE", &go)
            .env("WRIT_AUDIENCE", audience)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // libtest prints "test helper ... " without a newline first.
                if let Some((_, rest)) = line.split_once("TOKEN ") {
                    let _ = tx.send(rest.to_owned());
                }
            }
        });
        TokenChild {
            child,
            go,
            lines: rx,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Lets the child fetch, and returns its tokens: (spiffe id, token).
    fn fetch(&self, count: usize) -> Vec<(String, String)> {
        std::fs::write(&self.go, b"go").unwrap();
        (0..count)
            .map(|_| {
                let line = self
                    .lines
                    .recv_timeout(Duration::from_secs(20))
                    .expect("no token from the bound child");
                let (id, token) = line.split_once(' ').unwrap();
                (id.to_owned(), token.to_owned())
            })
            .collect()
    }
}

impl Drop for TokenChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn tasks_client(writ: &Writ) -> apb::tasks_client::TasksClient<tonic::transport::Channel> {
    apb::tasks_client::TasksClient::new(
        writ::cli::client::connect(&writ.dir.path().join("run/admin.sock"))
            .await
            .unwrap(),
    )
}

fn begin(id: &str, pid: u32, parent: &str) -> apb::BeginTaskRequest {
    apb::BeginTaskRequest {
        task_id: id.into(),
        parent_task_id: parent.into(),
        binding: Some(apb::Binding {
            target: Some(apb::binding::Target::Pid(pid as i32)),
        }),
        intent: Some(apb::Intent {
            purpose: "triage tickets".into(),
            tools: vec!["jira".into()],
            targets: vec!["tickets".into()],
            data_class: "internal".into(),
            attributes: Default::default(),
        }),
        ..Default::default()
    }
}

/// A token of another trust domain validates only for a caller that
/// federates with it, as in SPIRE: writ holding that domain's bundle (for
/// other workloads) is no reason for every caller to trust its tokens.
/// writ used to validate against every bundle it held.
#[tokio::test(flavor = "multi_thread")]
async fn a_foreign_token_validates_only_for_callers_that_federate_with_its_trust_domain() {
    let writ = Writ::start(&config(""));
    let admin = writ.dir.path().join("run/admin.sock");
    let admin = admin.to_str().unwrap();
    let other_key = JwtSigningKey::generate().unwrap();
    let mut other = writ::bundle::TrustBundle::new("other.test".parse().unwrap());
    other.jwt_authorities.push(other_key.authority());
    let bundle_file = writ.dir.path().join("other.json");
    std::fs::write(&bundle_file, other.to_spiffe_json()).unwrap();
    let (ok, _, stderr) = common::writ_cli(
        &[
            "bundle",
            "set",
            "--trust-domain",
            "other.test",
            "--format",
            "spiffe",
            "--file",
            bundle_file.to_str().unwrap(),
            "--admin-socket",
            admin,
        ],
        None,
    );
    assert!(ok, "{stderr}");
    let claims = object(json!({
        "sub": "spiffe://other.test/agent",
        "aud": "api",
        "exp": unix_now() + 300,
    }));
    let token = other_key.sign(&claims).unwrap();
    assert_refused(
        &writ,
        "a caller that does not federate with other.test",
        &token,
        "api",
        "no JWT bundle for trust domain other.test",
    )
    .await;

    // One of the caller's identities federates with other.test.
    let uid = nix::unistd::geteuid().as_raw();
    let (ok, _, stderr) = common::writ_cli(
        &[
            "entry",
            "create",
            "--spiffe-id",
            SECOND_ID,
            "--selector",
            &format!("unix:uid:{uid}"),
            "--federates-with",
            "other.test",
            "--admin-socket",
            admin,
        ],
        None,
    );
    assert!(ok, "{stderr}");
    let valid = validate(&writ, &token, "api").await.unwrap();
    assert_eq!(valid.spiffe_id, "spiffe://other.test/agent");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tasks_token_stops_validating_when_the_task_ends() {
    let writ = Writ::start(&config(""));
    let child = TokenChild::spawn(&writ, "worker", "tool-api");
    let mut tasks = tasks_client(&writ).await;
    tasks
        .begin_task(begin("t-rev", child.pid(), ""))
        .await
        .unwrap();
    let tokens = child.fetch(2);
    let task_id = format!("{ORCH_ID}/task/t-rev");
    assert_eq!(tokens[0].0, task_id, "the task identity is the default");
    assert_eq!(tokens[1].0, ORCH_ID);
    let (task_token, plain_token) = (&tokens[0].1, &tokens[1].1);

    let claims = claims_of(task_token);
    assert_eq!(
        claims["task"],
        json!({
            "id": "t-rev", "purpose": "triage tickets", "tools": ["jira"],
            "targets": ["tickets"], "data_class": "internal", "orchestrator": ORCH_ID
        })
    );
    assert!(
        claims.get("act").is_none(),
        "a top-level task has no delegators"
    );
    let valid = validate(&writ, task_token, "tool-api").await.unwrap();
    assert_eq!(valid.spiffe_id, task_id);

    tasks
        .end_task(apb::EndTaskRequest {
            task_id: "t-rev".into(),
            reason: "done".into(),
        })
        .await
        .unwrap();
    assert_refused(
        &writ,
        "ended task",
        task_token,
        "tool-api",
        "task t-rev revoked",
    )
    .await;
    // The same process's other identity is unaffected.
    validate(&writ, plain_token, "tool-api").await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sub_tasks_token_carries_the_act_chain_of_its_parents() {
    let writ = Writ::start(&config(""));
    let mut tasks = tasks_client(&writ).await;
    // Three levels, each bound to its own process: a process inside a
    // sub-task's binding holds the sub-task's identity, not its parents'.
    let mut tokens = Vec::new();
    let mut children = Vec::new();
    for id in ["search", "research", "plan"] {
        children.push(TokenChild::spawn(&writ, id, "tool-api"));
    }
    for (child, (id, parent)) in
        children
            .iter()
            .rev()
            .zip([("plan", ""), ("research", "plan"), ("search", "research")])
    {
        tasks
            .begin_task(begin(id, child.pid(), parent))
            .await
            .unwrap();
    }
    for child in &children {
        let fetched = child.fetch(2);
        assert_eq!(fetched[1].0, ORCH_ID, "{fetched:?}");
        tokens.push(fetched[0].clone());
    }
    let plan = format!("{ORCH_ID}/task/plan");
    let research = format!("{plan}/task/research");
    let search = format!("{research}/task/search");
    let ids: Vec<&str> = tokens.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, vec![search.as_str(), &research, &plan]);

    let deepest = claims_of(&tokens[0].1);
    assert_eq!(
        deepest["act"],
        json!({"sub": research, "act": {"sub": plan, "act": {"sub": ORCH_ID}}}),
        "RFC 8693 nesting: the parent acts, on behalf of its parent, up to the orchestrator"
    );
    assert_eq!(deepest["task"]["id"], "search");
    assert_eq!(deepest["task"]["parent_id"], "research");
    let middle = claims_of(&tokens[1].1);
    assert_eq!(middle["act"], json!({"sub": plan, "act": {"sub": ORCH_ID}}));
    assert_eq!(middle["task"]["parent_id"], "plan");
    let top = claims_of(&tokens[2].1);
    assert!(top.get("act").is_none());
    assert!(top["task"].get("parent_id").is_none());

    // ValidateJWTSVID hands the chain back as a Struct.
    let valid = validate(&writ, &tokens[0].1, "tool-api").await.unwrap();
    use prost_types::value::Kind;
    let Some(Kind::StructValue(act)) = &valid.claims.unwrap().fields["act"].kind else {
        panic!("act is not a struct");
    };
    assert_eq!(
        act.fields["sub"].kind,
        Some(Kind::StringValue(research.clone()))
    );

    // Ending the top-level task revokes the whole chain's tokens.
    tasks
        .end_task(apb::EndTaskRequest {
            task_id: "plan".into(),
            reason: String::new(),
        })
        .await
        .unwrap();
    assert_refused(
        &writ,
        "cascaded",
        &tokens[0].1,
        "tool-api",
        "task search revoked",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_jwt_bundle_stream_publishes_a_new_key_before_it_signs() {
    // A short CA lifetime so the schedule runs within the test: the next
    // key appears at half-life and takes over at 5/6.
    // (The first line still belongs to `[tasks]`.)
    let writ = Writ::start(&config(
        "x509_svid_ttl = \"2s\"\n\n[ca]\nca_ttl = \"20s\"\nx509_svid_ttl = \"2s\"\njwt_svid_ttl = \"2s\"\n",
    ));
    let mut stream = client(&writ)
        .await
        .fetch_jwt_bundles(with_header(pb::JwtBundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    let kids = |m: &pb::JwtBundlesResponse| -> HashSet<String> {
        assert_eq!(m.bundles.len(), 1, "full state: exactly our trust domain");
        let jwks: Value = serde_json::from_slice(&m.bundles["spiffe://writ.test"]).unwrap();
        jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_owned())
            .collect()
    };
    let first = stream.message().await.unwrap().unwrap();
    let first_kids = kids(&first);
    let first_signer = header_of(&fetch_jwt(&writ, &["a"], "").await.unwrap().svids[0].svid)["kid"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(first_kids.contains(&first_signer));

    // Wait for a pushed update that adds a key.
    let mut published = first_kids.clone();
    let added = loop {
        let m = tokio::time::timeout(Duration::from_secs(60), stream.message())
            .await
            .expect("no JWT bundle update")
            .unwrap()
            .unwrap();
        let now = kids(&m);
        published.extend(now.iter().cloned());
        if let Some(new) = now.difference(&first_kids).next() {
            break new.clone();
        }
    };
    // Then wait until tokens are signed by a key other than the first: it
    // must be one the stream already delivered.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let next_signer = loop {
        let svids = fetch_jwt(&writ, &["a"], "").await.unwrap().svids;
        let kid = header_of(&svids[0].svid)["kid"]
            .as_str()
            .unwrap()
            .to_owned();
        if kid != first_signer {
            break kid;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no new JWT signer within 60s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        published.contains(&next_signer),
        "{next_signer} signed before the bundle stream published it"
    );
    assert_eq!(next_signer, added);
}

/// Not a test: the body of helper processes started by the tests above.
#[test]
#[ignore = "helper process entry point, run by other tests"]
fn helper() {
    let role = std::env::var("WRIT_TEST_HELPER").expect("run only as a helper");
    assert_eq!(role, "jwt-child");
    let go = std::env::var("WRIT_GO_FILE").unwrap();
    let socket = PathBuf::from(std::env::var("WRIT_SOCKET").unwrap());
    let audience = std::env::var("WRIT_AUDIENCE").unwrap();
    common::wait_for(Duration::from_secs(120), "go file", || {
        std::fs::metadata(&go).ok()
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let mut c =
            SpiffeWorkloadApiClient::new(writ::cli::client::connect(&socket).await.unwrap());
        let response = c
            .fetch_jwtsvid(with_header(pb::JwtsvidRequest {
                audience: vec![audience],
                spiffe_id: String::new(),
            }))
            .await
            .unwrap()
            .into_inner();
        for svid in response.svids {
            println!("TOKEN {} {}", svid.spiffe_id, svid.svid);
        }
        std::io::stdout().flush().unwrap();
    });
    std::thread::sleep(Duration::from_secs(300));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_process_refetching_gets_its_own_token_again_until_half_life() {
    let writ = Writ::start(&config("[ca]\njwt_svid_ttl = \"4s\"\n"));
    let token = |r: pb::JwtsvidResponse| r.svids[0].svid.clone();
    let first = token(fetch_jwt(&writ, &["api"], "").await.unwrap());
    let again = token(fetch_jwt(&writ, &["api"], "").await.unwrap());
    assert_eq!(first, again, "same process, identity and audience");
    let other_audience = token(fetch_jwt(&writ, &["other"], "").await.unwrap());
    assert_ne!(claims_of(&other_audience)["jti"], claims_of(&first)["jti"]);

    // Another process asking for the same audience gets a token of its own,
    // so every token's issuance record names the one process that has it.
    let (ok, stdout, stderr) = common::writ_cli(
        &[
            "api",
            "fetch",
            "jwt",
            "--audience",
            "api",
            "--socket",
            writ.socket.to_str().unwrap(),
            "--output",
            "json",
        ],
        None,
    );
    assert!(ok, "{stderr}");
    let printed: Value = serde_json::from_str(&stdout).unwrap();
    assert_ne!(printed[0]["claims"]["jti"], claims_of(&first)["jti"]);

    // Past half of its 4 s life the token is renewed.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let renewed = token(fetch_jwt(&writ, &["api"], "").await.unwrap());
    assert_ne!(claims_of(&renewed)["jti"], claims_of(&first)["jti"]);

    // One issuance record per token handed out, none for the re-served one.
    let trail = std::fs::read_to_string(writ.dir.path().join("state/audit/audit.jsonl")).unwrap();
    let jti = claims_of(&first)["jti"].as_str().unwrap().to_owned();
    let records = trail
        .lines()
        .filter(|l| l.contains("\"jwt_issued\"") && l.contains(&jti))
        .count();
    assert_eq!(records, 1, "{trail}");
}
