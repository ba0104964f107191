//! Push rules (`/pushrules/…`): each user's ruleset, kept by the services
//! as the user's `m.push_rules` account data and evaluated by their push
//! worker; `/notifications`, `/pushers` and `/pushers/set`.

use ruma::api::client::push::{
    PushRule, delete_pushrule, get_notifications, get_pushers, get_pushrule, get_pushrule_actions,
    get_pushrule_enabled, get_pushrules_all, get_pushrules_global_scope, set_pusher, set_pushrule,
    set_pushrule_actions, set_pushrule_enabled,
};
use weft_core::Error;

use crate::AppState;
use crate::endpoint::Ruma;

/// The caller's whole ruleset: the server defaults with the caller's
/// changes, and the caller's own rules.
pub async fn all(
    s: AppState,
    req: Ruma<get_pushrules_all::v3::Request>,
) -> Result<get_pushrules_all::v3::Response, Error> {
    Ok(get_pushrules_all::v3::Response::new(s.push_rules(&req.caller).await?))
}

/// The caller's `global` ruleset (the only one), as [`all`] has it.
pub async fn global(
    s: AppState,
    req: Ruma<get_pushrules_global_scope::v3::Request>,
) -> Result<get_pushrules_global_scope::v3::Response, Error> {
    Ok(get_pushrules_global_scope::v3::Response::new(
        s.push_rules(&req.caller).await?,
    ))
}

pub async fn get(s: AppState, req: Ruma<get_pushrule::v3::Request>) -> Result<get_pushrule::v3::Response, Error> {
    let b = req.body;
    let rule = s.push_rule(&req.caller, b.kind, &b.rule_id).await?;
    Ok(get_pushrule::v3::Response::new(PushRule::from(rule)))
}

pub async fn set(s: AppState, req: Ruma<set_pushrule::v3::Request>) -> Result<set_pushrule::v3::Response, Error> {
    let b = req.body;
    s.set_push_rule(&req.caller, b.rule, b.before, b.after).await?;
    Ok(set_pushrule::v3::Response::new())
}

pub async fn delete(
    s: AppState,
    req: Ruma<delete_pushrule::v3::Request>,
) -> Result<delete_pushrule::v3::Response, Error> {
    let b = req.body;
    s.delete_push_rule(&req.caller, b.kind, b.rule_id).await?;
    Ok(delete_pushrule::v3::Response::new())
}

pub async fn get_enabled(
    s: AppState,
    req: Ruma<get_pushrule_enabled::v3::Request>,
) -> Result<get_pushrule_enabled::v3::Response, Error> {
    let b = req.body;
    let rule = s.push_rule(&req.caller, b.kind, &b.rule_id).await?;
    Ok(get_pushrule_enabled::v3::Response::new(rule.enabled()))
}

pub async fn set_enabled(
    s: AppState,
    req: Ruma<set_pushrule_enabled::v3::Request>,
) -> Result<set_pushrule_enabled::v3::Response, Error> {
    let b = req.body;
    s.set_push_rule_enabled(&req.caller, b.kind, b.rule_id, b.enabled)
        .await?;
    Ok(set_pushrule_enabled::v3::Response::new())
}

pub async fn get_actions(
    s: AppState,
    req: Ruma<get_pushrule_actions::v3::Request>,
) -> Result<get_pushrule_actions::v3::Response, Error> {
    let b = req.body;
    let rule = s.push_rule(&req.caller, b.kind, &b.rule_id).await?;
    Ok(get_pushrule_actions::v3::Response::new(rule.actions().to_vec()))
}

pub async fn set_actions(
    s: AppState,
    req: Ruma<set_pushrule_actions::v3::Request>,
) -> Result<set_pushrule_actions::v3::Response, Error> {
    let b = req.body;
    s.set_push_rule_actions(&req.caller, b.kind, b.rule_id, b.actions)
        .await?;
    Ok(set_pushrule_actions::v3::Response::new())
}

pub async fn notifications(
    s: AppState,
    req: Ruma<get_notifications::v3::Request>,
) -> Result<get_notifications::v3::Response, Error> {
    let b = req.body;
    let limit = b.limit.map(u64::from);
    let (list, next) = s
        .notifications(&req.caller, b.from.as_deref(), limit, b.only.as_deref())
        .await?;
    let mut resp = get_notifications::v3::Response::new(list);
    resp.next_token = next;
    Ok(resp)
}

pub async fn pushers(s: AppState, req: Ruma<get_pushers::v3::Request>) -> Result<get_pushers::v3::Response, Error> {
    Ok(get_pushers::v3::Response::new(s.pushers(&req.caller).await?))
}

pub async fn set_pusher(s: AppState, req: Ruma<set_pusher::v3::Request>) -> Result<set_pusher::v3::Response, Error> {
    s.set_pusher(&req.caller, req.body.action).await?;
    Ok(set_pusher::v3::Response::new())
}
