//! Push rules: each user's ruleset, kept as their global account data of
//! type `m.push_rules` (`{"global": RULESET}`, as clients also find it in
//! `/sync`). What a user sees is always the server's current default rules
//! (ruma's [`Ruleset::server_default`]) with the user's changes to them
//! (`enabled`, `actions`) and the user's own rules, so defaults a newer
//! server brings appear for everyone. Every edit is one read-modify-write
//! of the store's writer ([`weft_store::Store::edit_account_data`]): edits
//! racing each other are applied one after the other and none is lost,
//! with nothing held in memory. The push worker (push.rs) evaluates them
//! against every new room event.

use ruma::UserId;
use ruma::push::{
    Action, AnyPushRule, InsertPushRuleError, NewConditionalPushRule, NewPatternedPushRule, NewPushRule,
    NewSimplePushRule, RemovePushRuleError, RuleKind, Ruleset,
};
use serde_json::json;
use weft_core::{Error, Result};

use crate::{Services, Session};

/// The account data type the ruleset is kept under.
pub const PUSH_RULES: &str = "m.push_rules";

impl Services {
    /// The session user's push rules.
    pub async fn push_rules(&self, session: &Session) -> Result<Ruleset> {
        let stored = self
            .store
            .get_account_data(session.user_id.as_str(), None, PUSH_RULES)
            .await?;
        Ok(ruleset_of(&session.user_id, stored.as_deref()))
    }

    /// One push rule of the session user; `M_NOT_FOUND` if there is none.
    pub async fn push_rule(&self, session: &Session, kind: RuleKind, rule_id: &str) -> Result<AnyPushRule> {
        let rules = self.push_rules(session).await?;
        rules.get(kind, rule_id).map(|r| r.to_owned()).ok_or_else(not_found)
    }

    /// Adds or replaces a rule of the user's own, placed right after the
    /// rule `after` or right before `before` (both of the user's own, of
    /// the same kind), else, when new, first of its kind (after
    /// `.m.rule.master` for `override`). A replaced rule keeps its
    /// `enabled` (and its place, unless `before` or `after` move it).
    /// Server-default rules cannot be replaced.
    pub async fn set_push_rule(
        &self,
        session: &Session,
        rule: NewPushRule,
        before: Option<String>,
        after: Option<String>,
    ) -> Result<()> {
        let (kind, id) = (rule.kind(), rule.rule_id().to_owned());
        if before.as_deref() == Some(&id) || after.as_deref() == Some(&id) {
            return Err(Error::invalid_param("A rule cannot be placed relative to itself"));
        }
        self.edit_push_rules(session, move |rules| {
            // A rule being moved is taken out first, keeping its
            // `enabled`: ruma moves a replaced rule after the last one of
            // its kind out of bounds.
            let moved = (before.is_some() || after.is_some()) && !id.starts_with('.');
            let enabled = match rules.get(kind.clone(), &id) {
                Some(old) if moved => {
                    let enabled = old.enabled();
                    let _ = rules.remove(kind.clone(), &id);
                    Some(enabled)
                }
                _ => None,
            };
            rules
                .insert(rule, after.as_deref(), before.as_deref())
                .map_err(|e| match e {
                    InsertPushRuleError::UnknownRuleId => {
                        Error::not_found("The rule named by `before` or `after` does not exist")
                    }
                    InsertPushRuleError::ServerDefaultRuleId => {
                        Error::invalid_param("Rule IDs starting with '.' are reserved for server-default rules")
                    }
                    e => Error::invalid_param(e.to_string()),
                })?;
            if let Some(enabled) = enabled {
                rules.set_enabled(kind, &id, enabled).map_err(|_| not_found())?;
            }
            Ok(())
        })
        .await
    }

    /// Removes a rule of the user's own; server-default rules cannot be
    /// removed.
    pub async fn delete_push_rule(&self, session: &Session, kind: RuleKind, rule_id: String) -> Result<()> {
        self.edit_push_rules(session, move |rules| {
            rules.remove(kind, &rule_id).map_err(|e| match e {
                RemovePushRuleError::ServerDefault => {
                    Error::invalid_param("Server-default rules cannot be deleted (disable them instead)")
                }
                _ => not_found(),
            })
        })
        .await
    }

    /// Enables or disables a rule (a server default or the user's own).
    pub async fn set_push_rule_enabled(
        &self,
        session: &Session,
        kind: RuleKind,
        rule_id: String,
        enabled: bool,
    ) -> Result<()> {
        self.edit_push_rules(session, move |rules| {
            rules.set_enabled(kind, &rule_id, enabled).map_err(|_| not_found())
        })
        .await
    }

    /// Sets the actions of a rule (a server default or the user's own).
    pub async fn set_push_rule_actions(
        &self,
        session: &Session,
        kind: RuleKind,
        rule_id: String,
        actions: Vec<Action>,
    ) -> Result<()> {
        self.edit_push_rules(session, move |rules| {
            rules.set_actions(kind, &rule_id, actions).map_err(|_| not_found())
        })
        .await
    }

    /// Applies `edit` to the user's ruleset and stores the result, in one
    /// write of the store's writer (so `edit` must be quick); when `edit`
    /// fails nothing is stored.
    async fn edit_push_rules(
        &self,
        session: &Session,
        edit: impl FnOnce(&mut Ruleset) -> Result<()> + Send + 'static,
    ) -> Result<()> {
        let user = session.user_id.clone();
        self.store
            .edit_account_data(
                session.user_id.as_str(),
                None,
                PUSH_RULES,
                Box::new(move |stored| {
                    let mut rules = ruleset_of(&user, stored.as_deref());
                    edit(&mut rules)?;
                    serde_json::to_string(&json!({ "global": rules })).map_err(Error::internal)
                }),
            )
            .await
            .map_err(|_| Error::internal("push rules not stored"))??;
        Ok(())
    }
}

fn not_found() -> Error {
    Error::not_found("Push rule not found")
}

/// The ruleset of `user`: the server-default rules, with the `enabled`
/// and `actions` the stored ruleset (the content of their `m.push_rules`,
/// if any) gives them, and the user's own stored rules, in their stored
/// order, first of their kind (after `.m.rule.master` for `override`), as
/// [`Ruleset::insert`] keeps them. A stored ruleset that cannot be read
/// counts as none.
pub(crate) fn ruleset_of(user: &UserId, stored: Option<&str>) -> Ruleset {
    let mut rules = Ruleset::server_default(user);
    let Some(stored) = stored
        .and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok())
        .and_then(|mut v| serde_json::from_value::<Ruleset>(v.get_mut("global")?.take()).ok())
    else {
        return rules;
    };
    let mut own = Vec::new();
    for rule in stored {
        let kind = kind_of(&rule);
        let Some(kind) = kind else { continue };
        if rule.is_server_default() {
            // Defaults the server no longer has are dropped.
            if rules.get(kind.clone(), rule.rule_id()).is_some() {
                let _ = rules.set_enabled(kind.clone(), rule.rule_id(), rule.enabled());
                let _ = rules.set_actions(kind, rule.rule_id(), rule.actions().to_vec());
            }
        } else {
            own.push((kind, rule));
        }
    }
    // Each newly inserted rule goes first of its kind: inserting the last
    // one first keeps the stored order.
    for (kind, rule) in own.into_iter().rev() {
        let (id, enabled) = (rule.rule_id().to_owned(), rule.enabled());
        let Some(new) = new_rule(rule) else { continue };
        if rules.insert(new, None, None).is_ok() {
            let _ = rules.set_enabled(kind, &id, enabled);
        }
    }
    rules
}

fn kind_of(rule: &AnyPushRule) -> Option<RuleKind> {
    match rule {
        AnyPushRule::Override(_) => Some(RuleKind::Override),
        AnyPushRule::Content(_) => Some(RuleKind::Content),
        AnyPushRule::Room(_) => Some(RuleKind::Room),
        AnyPushRule::Sender(_) => Some(RuleKind::Sender),
        AnyPushRule::Underride(_) => Some(RuleKind::Underride),
        _ => None,
    }
}

/// A stored rule of the user's own as the rule it was made from.
fn new_rule(rule: AnyPushRule) -> Option<NewPushRule> {
    Some(match rule {
        AnyPushRule::Override(r) => {
            NewPushRule::Override(NewConditionalPushRule::new(r.rule_id, r.conditions, r.actions))
        }
        AnyPushRule::Underride(r) => {
            NewPushRule::Underride(NewConditionalPushRule::new(r.rule_id, r.conditions, r.actions))
        }
        AnyPushRule::Content(r) => NewPushRule::Content(NewPatternedPushRule::new(r.rule_id, r.pattern, r.actions)),
        AnyPushRule::Room(r) => NewPushRule::Room(NewSimplePushRule::new(r.rule_id, r.actions)),
        AnyPushRule::Sender(r) => NewPushRule::Sender(NewSimplePushRule::new(r.rule_id, r.actions)),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use ruma::push::{NewPatternedPushRule, NewPushRule, RuleKind};
    use ruma::user_id;

    use super::*;

    fn content(id: &str) -> NewPushRule {
        NewPushRule::Content(NewPatternedPushRule::new(id.into(), id.into(), vec![Action::Notify]))
    }

    fn stored(rules: &Ruleset) -> String {
        json!({ "global": rules }).to_string()
    }

    #[test]
    fn nothing_stored_is_the_server_defaults() {
        let alice = user_id!("@alice:test");
        let got = serde_json::to_value(ruleset_of(alice, None)).unwrap();
        let want = serde_json::to_value(Ruleset::server_default(alice)).unwrap();
        assert_eq!(got, want);
        let got = serde_json::to_value(ruleset_of(alice, Some("not json"))).unwrap();
        assert_eq!(got, want);
    }

    #[test]
    fn own_rules_keep_their_order_and_defaults_their_changes() {
        let alice = user_id!("@alice:test");
        let mut rules = Ruleset::server_default(alice);
        rules.insert(content("a"), None, None).unwrap();
        rules.insert(content("c"), Some("a"), None).unwrap();
        rules.insert(content("b"), Some("a"), Some("c")).unwrap();
        rules.set_enabled(RuleKind::Content, "b", false).unwrap();
        rules.set_enabled(RuleKind::Override, ".m.rule.master", true).unwrap();
        rules
            .set_actions(RuleKind::Underride, ".m.rule.message", vec![])
            .unwrap();
        let back = ruleset_of(alice, Some(&stored(&rules)));
        assert_eq!(
            serde_json::to_value(&back).unwrap(),
            serde_json::to_value(&rules).unwrap()
        );
        let ids: Vec<_> = back.content.iter().map(|r| r.rule_id.as_str()).collect();
        assert_eq!(&ids[..3], ["a", "b", "c"]);
    }

    #[test]
    fn stale_defaults_are_dropped_and_missing_ones_come_back() {
        let alice = user_id!("@alice:test");
        let mut v = serde_json::to_value(Ruleset::server_default(alice)).unwrap();
        let over = v["override"].as_array_mut().unwrap();
        over.retain(|r| r["rule_id"] != ".m.rule.suppress_notices");
        over.push(json!({"rule_id": ".m.rule.gone", "default": true, "enabled": true,
            "conditions": [], "actions": []}));
        let back = ruleset_of(alice, Some(&json!({ "global": v }).to_string()));
        assert!(back.get(RuleKind::Override, ".m.rule.suppress_notices").is_some());
        assert!(back.get(RuleKind::Override, ".m.rule.gone").is_none());
    }
}
