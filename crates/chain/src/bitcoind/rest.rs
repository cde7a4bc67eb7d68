//! The REST transport (`/rest/…`): one GET, and its status as a
//! [`SourceError`].

use bytes::Bytes;
use reqwest::StatusCode;

use super::{BitcoindError, BitcoindSource, Lane};
use crate::source::{Missing, SourceError};

/// Most headers or filter headers Core's REST interface returns at once
/// (`MAX_REST_HEADERS_RESULTS`).
pub(super) const REST_MAX_HEADERS: u32 = 2000;

impl BitcoindSource {
    /// A REST GET of `/rest/<path>`: the status and body.
    pub(super) async fn rest_get(
        &self,
        lane: Lane,
        path: &str,
    ) -> Result<(StatusCode, Bytes), SourceError> {
        // Never closed: the semaphores live as long as `self`.
        let _turn = self.lane(lane).acquire().await.ok();
        let response = self
            .http
            .get(format!("{}/rest/{path}", self.url))
            .send()
            .await
            .map_err(|e| self.transport_error(e))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| self.transport_error(e))?;
        Ok((status, body))
    }

    /// A REST read whose 200 body is returned; 404 is `missing` not found,
    /// 400 about the filter index a configuration error, anything else
    /// unavailable.
    pub(super) async fn rest_read(
        &self,
        lane: Lane,
        path: &str,
        missing: Missing,
    ) -> Result<Bytes, SourceError> {
        let (status, body) = self.rest_get(lane, path).await?;
        match status {
            StatusCode::OK => Ok(body),
            StatusCode::NOT_FOUND => Err(SourceError::NotFound(missing)),
            StatusCode::BAD_REQUEST if body.starts_with(b"Index is not enabled") => {
                Err(BitcoindError::NoFilterIndex {
                    url: self.url.clone(),
                }
                .into())
            }
            _ => Err(SourceError::Unavailable {
                reason: format!(
                    "/rest/{path}: HTTP {status}: {}",
                    String::from_utf8_lossy(&body[..body.len().min(200)]).trim_end()
                ),
            }),
        }
    }
}
