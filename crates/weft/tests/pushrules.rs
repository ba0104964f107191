//! Push rules: each user's ruleset (the spec's server defaults, the
//! user's changes to them and their own rules), kept as `m.push_rules`
//! account data and edited through `/pushrules/global/{kind}/{ruleId}`.

mod common;

use common::*;
use serde_json::{Value, json};

/// The rule IDs of one kind, in order.
fn ids(rules: &Value, kind: &str) -> Vec<String> {
    rules["global"][kind]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| r["rule_id"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn rule<'a>(rules: &'a Value, kind: &str, id: &str) -> &'a Value {
    rules["global"][kind]
        .as_array()
        .and_then(|a| a.iter().find(|r| r["rule_id"] == id))
        .unwrap_or_else(|| panic!("no {kind} rule {id}: {rules}"))
}

async fn all_rules(c: &Client) -> Value {
    let (st, rules) = c.get("pushrules/").await;
    assert_eq!(st, 200, "{rules}");
    rules
}

fn content_rule(pattern: &str) -> Value {
    json!({"pattern": pattern, "actions": ["notify", {"set_tweak": "sound", "value": "ding"}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_ruleset_has_the_spec_defaults() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let rules = all_rules(&alice).await;
    let over = ids(&rules, "override");
    assert_eq!(over.first().map(String::as_str), Some(".m.rule.master"), "{rules}");
    for id in [
        ".m.rule.suppress_notices",
        ".m.rule.invite_for_me",
        ".m.rule.member_event",
        ".m.rule.is_user_mention",
        ".m.rule.is_room_mention",
        ".m.rule.tombstone",
        ".m.rule.reaction",
        ".m.rule.room.server_acl",
        ".m.rule.suppress_edits",
    ] {
        assert!(over.contains(&id.to_owned()), "{id} missing: {rules}");
    }
    let under = ids(&rules, "underride");
    for id in [
        ".m.rule.call",
        ".m.rule.encrypted_room_one_to_one",
        ".m.rule.room_one_to_one",
        ".m.rule.message",
        ".m.rule.encrypted",
    ] {
        assert!(under.contains(&id.to_owned()), "{id} missing: {rules}");
    }
    let master = rule(&rules, "override", ".m.rule.master");
    assert_eq!(master["enabled"], false, "{master}");
    assert_eq!(master["default"], true, "{master}");
    // No rules of the user's own yet.
    for kind in ["room", "sender"] {
        assert_eq!(ids(&rules, kind), Vec::<String>::new(), "{rules}");
    }
    assert!(
        rules["global"]["override"]
            .as_array()
            .is_some_and(|a| a.iter().all(|r| r["default"] == true)),
        "{rules}"
    );

    // The `global` scope alone, and one rule, say the same.
    let (st, global) = alice.get("pushrules/global/").await;
    assert_eq!((st, &global), (200, &rules["global"]));
    let (st, one) = alice.get("pushrules/global/override/.m.rule.master").await;
    assert_eq!((st, &one), (200, master));
    let (st, enabled) = alice.get("pushrules/global/override/.m.rule.master/enabled").await;
    assert_eq!((st, enabled), (200, json!({"enabled": false})));
    let (st, actions) = alice.get("pushrules/global/underride/.m.rule.message/actions").await;
    assert_eq!(
        (st, &actions["actions"]),
        (200, &rule(&rules, "underride", ".m.rule.message")["actions"])
    );

    assert_err(&alice.get("pushrules/global/override/nope").await, 404, "M_NOT_FOUND");
    assert_err(
        &alice.get("pushrules/global/content/.m.rule.master").await,
        404,
        "M_NOT_FOUND",
    );
    assert_err(
        &alice.get("pushrules/global/override/nope/enabled").await,
        404,
        "M_NOT_FOUND",
    );
    assert_err(
        &server.anon().get("pushrules/global/override/.m.rule.master").await,
        401,
        "M_MISSING_TOKEN",
    );
}

// Own rules go first of their kind (after `.m.rule.master` for override),
// or where `before`/`after` place them; they survive a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_rules_are_placed_by_before_and_after() {
    let mut server = TestServer::start().await;
    let alice = server.register("alice").await;
    let put = |id: &str, query: &str| {
        let path = format!("pushrules/global/content/{id}{query}");
        let alice = alice.clone();
        let body = content_rule(&format!("word-{id}"));
        async move { alice.put(&path, body).await }
    };
    for (id, query) in [
        ("a", ""),
        ("c", "?after=a"),
        ("b", "?before=c"),
        ("z", ""),
        ("y", "?after=z&before=a"),
    ] {
        let (st, body) = put(id, query).await;
        assert_eq!(st, 200, "{id}{query}: {body}");
        assert_eq!(body, json!({}));
    }
    let rules = all_rules(&alice).await;
    let own: Vec<String> = ids(&rules, "content")
        .into_iter()
        .filter(|id| !id.starts_with('.'))
        .collect();
    assert_eq!(own, ["z", "y", "a", "b", "c"], "{rules}");
    // Before the server's own content rules, if it has any.
    assert_eq!(ids(&rules, "content")[..5], own[..], "{rules}");

    let (st, b) = alice.get("pushrules/global/content/b").await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(
        b,
        json!({
            "rule_id": "b",
            "pattern": "word-b",
            "actions": ["notify", {"set_tweak": "sound", "value": "ding"}],
            "enabled": true,
            "default": false,
        })
    );

    // Replacing a rule keeps its place and its `enabled`.
    let (st, _) = alice
        .put("pushrules/global/content/b/enabled", json!({"enabled": false}))
        .await;
    assert_eq!(st, 200);
    let (st, got) = alice
        .put("pushrules/global/content/b", json!({"pattern": "other", "actions": []}))
        .await;
    assert_eq!(st, 200, "{got}");
    let rules = all_rules(&alice).await;
    assert_eq!(ids(&rules, "content")[..5], ["z", "y", "a", "b", "c"], "{rules}");
    let b = rule(&rules, "content", "b");
    assert_eq!(
        (&b["pattern"], &b["enabled"], &b["actions"]),
        (&json!("other"), &json!(false), &json!([])),
        "{b}"
    );

    // An own override rule goes right after the master rule.
    let (st, got) = alice
        .put(
            "pushrules/global/override/mine",
            json!({"conditions": [{"kind": "event_match", "key": "type", "pattern": "m.room.topic"}],
                   "actions": []}),
        )
        .await;
    assert_eq!(st, 200, "{got}");
    let rules = all_rules(&alice).await;
    assert_eq!(ids(&rules, "override")[..2], [".m.rule.master", "mine"], "{rules}");
    // Room and sender rules: their ID is the room or the user.
    let room = alice.create_room(json!({})).await;
    let (st, got) = alice
        .put(
            &format!("pushrules/global/room/{}", enc(&room)),
            json!({"actions": ["notify"]}),
        )
        .await;
    assert_eq!(st, 200, "{got}");
    let (st, got) = alice
        .put(
            &format!("pushrules/global/sender/{}", enc("@bob:elsewhere")),
            json!({"actions": []}),
        )
        .await;
    assert_eq!(st, 200, "{got}");

    // They survive a restart.
    let before = all_rules(&alice).await;
    assert_eq!(ids(&before, "room"), [room], "{before}");
    assert_eq!(ids(&before, "sender"), ["@bob:elsewhere"], "{before}");
    server.terminate(std::time::Duration::from_secs(10)).await;
    server.restart().await;
    assert_eq!(all_rules(&alice).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rules_are_refused() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let (st, got) = alice.put("pushrules/global/content/a", content_rule("a")).await;
    assert_eq!(st, 200, "{got}");
    let (st, _) = alice.put("pushrules/global/content/c", content_rule("c")).await;
    assert_eq!(st, 200);
    let before = all_rules(&alice).await;
    assert_eq!(ids(&before, "content")[..2], ["c", "a"], "{before}");

    // Placed relative to a rule that does not exist.
    assert_err(
        &alice
            .put("pushrules/global/content/b?after=nope", content_rule("b"))
            .await,
        404,
        "M_NOT_FOUND",
    );
    // Server-default rules cannot be replaced, nor be placed against.
    assert_err(
        &alice
            .put(
                "pushrules/global/override/.m.rule.master",
                json!({"conditions": [], "actions": []}),
            )
            .await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &alice
            .put(
                "pushrules/global/content/b?before=.m.rule.contains_user_name",
                content_rule("b"),
            )
            .await,
        400,
        "M_INVALID_PARAM",
    );
    // `before` higher than `after`.
    assert_err(
        &alice
            .put("pushrules/global/content/b?after=a&before=c", content_rule("b"))
            .await,
        400,
        "M_INVALID_PARAM",
    );
    // A content rule without a pattern, actions that are not a list, a
    // body that is not JSON.
    assert_err(
        &alice.put("pushrules/global/content/b", json!({"actions": []})).await,
        400,
        "M_BAD_JSON",
    );
    assert_err(
        &alice.put("pushrules/global/room/b", json!({"actions": "notify"})).await,
        400,
        "M_BAD_JSON",
    );
    let got = alice
        .request_raw(
            reqwest::Method::PUT,
            "pushrules/global/content/b",
            "application/json",
            b"{not json".to_vec(),
        )
        .await;
    assert_err(&got, 400, "M_NOT_JSON");
    // An unknown kind, a room rule whose ID is no room ID.
    assert_err(
        &alice.put("pushrules/global/nonsense/b", json!({"actions": []})).await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &alice.put("pushrules/global/room/b", json!({"actions": []})).await,
        400,
        "M_INVALID_PARAM",
    );
    // `enabled` must be a boolean.
    assert_err(
        &alice
            .put("pushrules/global/content/a/enabled", json!({"enabled": "yes"}))
            .await,
        400,
        "M_BAD_JSON",
    );
    // Nothing of it was stored.
    assert_eq!(all_rules(&alice).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enabled_and_actions_are_set() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let (st, got) = alice
        .put(
            "pushrules/global/override/.m.rule.master/enabled",
            json!({"enabled": true}),
        )
        .await;
    assert_eq!((st, got), (200, json!({})));
    let (st, got) = alice.get("pushrules/global/override/.m.rule.master/enabled").await;
    assert_eq!((st, got), (200, json!({"enabled": true})));
    let rules = all_rules(&alice).await;
    let master = rule(&rules, "override", ".m.rule.master");
    assert_eq!(
        (&master["enabled"], &master["default"]),
        (&json!(true), &json!(true)),
        "{master}"
    );
    assert_eq!(ids(&rules, "override")[0], ".m.rule.master");

    // Actions of a default rule, then of an own one.
    let actions =
        json!(["notify", {"set_tweak": "sound", "value": "bell"}, {"set_tweak": "highlight", "value": false}]);
    let (st, got) = alice
        .put(
            "pushrules/global/underride/.m.rule.message/actions",
            json!({"actions": actions}),
        )
        .await;
    assert_eq!((st, got), (200, json!({})));
    let (st, got) = alice.get("pushrules/global/underride/.m.rule.message/actions").await;
    assert_eq!((st, &got["actions"]), (200, &actions), "{got}");
    let rules = all_rules(&alice).await;
    let message = rule(&rules, "underride", ".m.rule.message");
    assert_eq!(message["actions"], actions, "{message}");
    assert_eq!(message["default"], true, "{message}");

    let (st, _) = alice.put("pushrules/global/content/a", content_rule("a")).await;
    assert_eq!(st, 200);
    let (st, _) = alice
        .put("pushrules/global/content/a/actions", json!({"actions": []}))
        .await;
    assert_eq!(st, 200);
    let (st, got) = alice.get("pushrules/global/content/a/actions").await;
    assert_eq!((st, got), (200, json!({"actions": []})));
    let (st, _) = alice
        .put("pushrules/global/content/a/enabled", json!({"enabled": false}))
        .await;
    assert_eq!(st, 200);
    let (st, got) = alice.get("pushrules/global/content/a").await;
    assert_eq!(st, 200, "{got}");
    assert_eq!((&got["enabled"], &got["actions"]), (&json!(false), &json!([])), "{got}");

    // Disabling the master rule again.
    let (st, _) = alice
        .put(
            "pushrules/global/override/.m.rule.master/enabled",
            json!({"enabled": false}),
        )
        .await;
    assert_eq!(st, 200);
    let (_, got) = alice.get("pushrules/global/override/.m.rule.master/enabled").await;
    assert_eq!(got, json!({"enabled": false}));

    // Unknown rules.
    assert_err(
        &alice
            .put("pushrules/global/override/nope/enabled", json!({"enabled": true}))
            .await,
        404,
        "M_NOT_FOUND",
    );
    assert_err(
        &alice
            .put("pushrules/global/room/.m.rule.master/actions", json!({"actions": []}))
            .await,
        404,
        "M_NOT_FOUND",
    );
    // Another user's rules are their own.
    let bob = server.register("bob").await;
    let rules = all_rules(&bob).await;
    assert_eq!(rule(&rules, "override", ".m.rule.master")["enabled"], false);
    assert!(!ids(&rules, "content").contains(&"a".to_owned()), "{rules}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_rules_are_deleted_and_defaults_are_not() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    for id in ["a", "b"] {
        let (st, _) = alice
            .put(&format!("pushrules/global/content/{id}"), content_rule(id))
            .await;
        assert_eq!(st, 200);
    }
    let (st, got) = alice.delete("pushrules/global/content/a").await;
    assert_eq!((st, got), (200, json!({})));
    assert_err(&alice.get("pushrules/global/content/a").await, 404, "M_NOT_FOUND");
    let rules = all_rules(&alice).await;
    let content = ids(&rules, "content");
    assert!(!content.contains(&"a".to_owned()), "{rules}");
    assert_eq!(content[0], "b", "{rules}");
    assert_err(&alice.delete("pushrules/global/content/a").await, 404, "M_NOT_FOUND");

    // A server default stays.
    assert_err(
        &alice.delete("pushrules/global/override/.m.rule.master").await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &alice.delete("pushrules/global/underride/.m.rule.message").await,
        400,
        "M_INVALID_PARAM",
    );
    assert_eq!(all_rules(&alice).await, rules);
    let (st, _) = alice.get("pushrules/global/override/.m.rule.master").await;
    assert_eq!(st, 200);
}

// Another client of the same user finds the ruleset in /sync's
// account_data; the account-data endpoints read it but cannot write it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_client_sees_m_push_rules_in_sync() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let phone = server.login("alice", &TestServer::default_password("alice")).await;
    let s0 = phone.sync(None, 0).await;
    let since = s0["next_batch"].as_str().expect("next_batch").to_owned();

    let (st, _) = alice.put("pushrules/global/content/cake", content_rule("cake")).await;
    assert_eq!(st, 200);
    let s1 = phone.sync(Some(&since), 5000).await;
    let events = s1["account_data"]["events"].as_array().cloned().unwrap_or_default();
    let pushed = of_type(&events, "m.push_rules");
    assert_eq!(pushed.len(), 1, "{s1}");
    let content = &pushed[0]["content"];
    assert_eq!(content["global"], all_rules(&alice).await["global"], "{content}");
    assert_eq!(rule(content, "content", "cake")["pattern"], "cake");

    // A new client's initial sync has it too, and the account-data
    // endpoint reads it.
    let laptop = server.login("alice", &TestServer::default_password("alice")).await;
    let s = laptop.sync(None, 0).await;
    let events = s["account_data"]["events"].as_array().cloned().unwrap_or_default();
    let pushed = of_type(&events, "m.push_rules");
    assert_eq!(pushed.len(), 1, "{s}");
    assert_eq!(pushed[0]["content"], *content);
    let path = format!("user/{}/account_data/m.push_rules", enc(&alice.user_id));
    let (st, got) = laptop.get(&path).await;
    assert_eq!((st, &got), (200, content));

    // Clients cannot write it there (the spec's 405 M_BAD_JSON), globally
    // or in a room.
    assert_err(&laptop.put(&path, json!({"global": {}})).await, 405, "M_BAD_JSON");
    let room = alice.create_room(json!({})).await;
    let room_path = format!(
        "user/{}/rooms/{}/account_data/m.push_rules",
        enc(&alice.user_id),
        enc(&room)
    );
    assert_err(&laptop.put(&room_path, json!({})).await, 405, "M_BAD_JSON");
    assert_eq!(all_rules(&alice).await["global"], content["global"]);
}

// Edits racing each other (two clients of one user) are all kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_edits_are_all_kept() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let phone = server.login("alice", &TestServer::default_password("alice")).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..24 {
        let c = if i % 2 == 0 { alice.clone() } else { phone.clone() };
        tasks.spawn(async move {
            let id = format!("rule{i}");
            let got = c
                .put(&format!("pushrules/global/content/{id}"), content_rule(&id))
                .await;
            (id, got)
        });
    }
    // And a change to a default rule in the middle of it.
    let c = phone.clone();
    tasks.spawn(async move {
        let got = c
            .put(
                "pushrules/global/override/.m.rule.master/enabled",
                json!({"enabled": true}),
            )
            .await;
        ("master".to_owned(), got)
    });
    while let Some(done) = tasks.join_next().await {
        let (id, (st, body)) = done.expect("task");
        assert_eq!(st, 200, "{id}: {body}");
    }
    let rules = all_rules(&alice).await;
    let content = ids(&rules, "content");
    for i in 0..24 {
        let id = format!("rule{i}");
        assert!(content.contains(&id), "{id} lost: {rules}");
    }
    assert_eq!(content.iter().filter(|id| id.starts_with("rule")).count(), 24);
    assert_eq!(rule(&rules, "override", ".m.rule.master")["enabled"], true, "{rules}");
}

// Moving a rule after the last rule of its kind (or after itself) is
// answered, and the server goes on storing edits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_a_rule_to_the_end_works() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    for id in ["a", "b", "c"] {
        let (st, _) = alice
            .put(&format!("pushrules/global/content/{id}"), content_rule(id))
            .await;
        assert_eq!(st, 200);
    }
    let rules = all_rules(&alice).await;
    assert_eq!(ids(&rules, "content"), ["c", "b", "a"], "{rules}");
    // c, now first, goes after the last one; its `enabled` stays.
    let (st, _) = alice
        .put("pushrules/global/content/c/enabled", json!({"enabled": false}))
        .await;
    assert_eq!(st, 200);
    let (st, got) = alice
        .put("pushrules/global/content/c?after=a", content_rule("c2"))
        .await;
    assert_eq!(st, 200, "{got}");
    let rules = all_rules(&alice).await;
    assert_eq!(ids(&rules, "content"), ["b", "a", "c"], "{rules}");
    let c = rule(&rules, "content", "c");
    assert_eq!((&c["pattern"], &c["enabled"]), (&json!("c2"), &json!(false)), "{c}");
    // And back to the front with `before`.
    let (st, got) = alice
        .put("pushrules/global/content/c?before=b", content_rule("c3"))
        .await;
    assert_eq!(st, 200, "{got}");
    assert_eq!(ids(&all_rules(&alice).await, "content"), ["c", "b", "a"]);
    // A rule placed against itself.
    let (st, got) = alice.put("pushrules/global/content/a?after=a", content_rule("a")).await;
    assert_eq!(st, 400, "{got}");
    assert_eq!(got["errcode"], "M_INVALID_PARAM", "{got}");
    let (st, got) = alice
        .put("pushrules/global/content/a?before=a", content_rule("a"))
        .await;
    assert_eq!(st, 400, "{got}");
    // Edits still work.
    let (st, got) = alice.put("pushrules/global/content/d", content_rule("d")).await;
    assert_eq!(st, 200, "{got}");
    assert_eq!(ids(&all_rules(&alice).await, "content"), ["d", "c", "b", "a"]);
}
