//! A write as every resource makes it: the change and its audit row in one transaction, committed
//! before the gateways are told what changed, so that a gateway reloading on the message reads the
//! new state. A [`Write`] commits only together with the [`Change`] it records.

use std::ops::{Deref, DerefMut};

use sqlx::{PgConnection, Postgres, Transaction};
use tollgate_core::invalidation::Invalidation;

use crate::{
    audit::{self, Change},
    auth::Caller,
    error::ApiResult,
    state::AppState,
};

/// An open write transaction on behalf of `caller`. Dropping it uncommitted (an early `?`) rolls
/// it back. It derefs to the transaction's connection for the statements of the change.
pub struct Write<'a> {
    state: &'a AppState,
    caller: &'a Caller,
    tx: Transaction<'static, Postgres>,
}

impl<'a> Write<'a> {
    pub async fn begin(state: &'a AppState, caller: &'a Caller) -> ApiResult<Self> {
        Ok(Self { state, caller, tx: state.db.begin().await? })
    }

    /// Records `change` in the audit trail, commits, then publishes `invalidations` (none when
    /// nothing a gateway holds can be stale, as for a new user, team or key). A publish that
    /// fails does not fail the write: the gateways' cache TTL is the backstop.
    pub async fn commit(
        mut self,
        change: Change,
        invalidations: impl IntoIterator<Item = Invalidation>,
    ) -> ApiResult<()> {
        audit::record(&mut self.tx, &self.caller.actor(), change).await?;
        self.tx.commit().await?;
        let messages: Vec<Invalidation> = invalidations.into_iter().collect();
        let sent = self.state.events.publish(&messages).await;
        let failed = messages.len() - sent;
        let metric = &self.state.metrics.invalidations;
        metric.with_label_values(&["published"]).inc_by(sent as u64);
        metric.with_label_values(&["failed"]).inc_by(failed as u64);
        Ok(())
    }
}

impl Deref for Write<'_> {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        &self.tx
    }
}

impl DerefMut for Write<'_> {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.tx
    }
}
