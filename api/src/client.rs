//! A small HTTP/1.1 client over the Unix socket, keeping one connection open (keep-alive).
//! Used by `vmmctl`, `api-bench` and the tests. Needs a tokio runtime.

use std::path::{Path, PathBuf};

use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::routes::FaultBody;

/// Why a call through [`Client`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be connected (no server, or the wrong path).
    #[error("cannot connect to the API socket {path}: {source}")]
    Connect {
        /// The socket's path.
        path: PathBuf,
        #[source]
        /// The connect error.
        source: std::io::Error,
    },
    /// The connection broke, or the answer was not HTTP.
    #[error("HTTP error talking to the API: {0}")]
    Http(#[from] hyper::Error),
    /// The request could not be built (a bad path or header).
    #[error("invalid request: {0}")]
    Request(String),
    /// The server answered with an error status.
    #[error("{method} {path}: HTTP {status}: {message}")]
    Status {
        /// The HTTP method of the request.
        method: Method,
        /// The request's path.
        path: String,
        /// The status the server answered.
        status: StatusCode,
        /// The server's `fault_message`, or the body as text.
        message: String,
    },
    /// The answer was not the JSON expected.
    #[error("cannot decode the answer to {path}: {source}")]
    Decode {
        /// The request's path.
        path: String,
        #[source]
        /// serde's error.
        source: serde_json::Error,
    },
}

/// A response: status and body.
#[derive(Debug, Clone)]
pub struct Reply {
    /// HTTP status.
    pub status: StatusCode,
    /// The `Content-Type` header, if any.
    pub content_type: Option<String>,
    /// Every header of the answer.
    pub headers: hyper::HeaderMap,
    /// The body, whole.
    pub body: Bytes,
}

impl Reply {
    /// The `fault_message` of an error body, if it is one.
    pub fn fault_message(&self) -> Option<String> {
        serde_json::from_slice::<FaultBody>(&self.body)
            .ok()
            .map(|f| f.fault_message)
    }
}

/// One keep-alive connection to the API socket, reopened when the server closed it.
pub struct Client {
    path: PathBuf,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Client {
    /// A client for the socket at `path`; it connects on the first request.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            sender: None,
        }
    }

    /// The socket this client talks to.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    async fn open(&mut self) -> Result<(), ClientError> {
        let stream = tokio::net::UnixStream::connect(&self.path)
            .await
            .map_err(|source| ClientError::Connect {
                path: self.path.clone(),
                source,
            })?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        self.sender = Some(sender);
        Ok(())
    }

    /// Sends any request and returns whatever the server answered, error statuses included.
    ///
    /// A kept-alive connection that the server closed meanwhile (it closes idle ones) is
    /// replaced and the request sent again, but only when hyper says the request never left.
    pub async fn raw(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Reply, ClientError> {
        let body = Bytes::from(body.unwrap_or_default());
        let mut reused = matches!(&self.sender, Some(s) if !s.is_closed());
        if !reused {
            self.open().await?;
        }
        let resp = loop {
            let mut builder = Request::builder()
                .method(method.clone())
                .uri(path)
                .header(hyper::header::HOST, "localhost");
            if !body.is_empty() {
                builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
            }
            let req = builder
                .body(Full::new(body.clone()))
                .map_err(|e| ClientError::Request(e.to_string()))?;
            let sender = self.sender.as_mut().expect("opened above");
            let not_sent = match sender.ready().await {
                Err(e) => Err(e),
                Ok(()) => match sender.try_send_request(req).await {
                    Ok(resp) => break resp,
                    Err(e) if e.message().is_some() => Err(e.into_error()),
                    Err(e) => {
                        self.sender = None;
                        return Err(e.into_error().into());
                    }
                },
            };
            self.sender = None;
            match not_sent {
                Err(_) if reused => {
                    reused = false;
                    self.open().await?;
                }
                Err(e) => return Err(e.into()),
                Ok(()) => unreachable!("the loop breaks with a response"),
            }
        };
        let status = resp.status();
        let content_type = resp
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok(Reply {
            status,
            content_type,
            headers,
            body,
        })
    }

    /// Sends a request and turns an error status into [`ClientError::Status`].
    pub async fn call(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Reply, ClientError> {
        let reply = self.raw(method.clone(), path, body).await?;
        if reply.status.is_client_error() || reply.status.is_server_error() {
            let message = reply
                .fault_message()
                .unwrap_or_else(|| String::from_utf8_lossy(&reply.body).into_owned());
            return Err(ClientError::Status {
                method,
                path: path.to_owned(),
                status: reply.status,
                message,
            });
        }
        Ok(reply)
    }

    /// `GET` and decode JSON.
    pub async fn get<T: DeserializeOwned>(&mut self, path: &str) -> Result<T, ClientError> {
        let reply = self.call(Method::GET, path, None).await?;
        serde_json::from_slice(&reply.body).map_err(|source| ClientError::Decode {
            path: path.to_owned(),
            source,
        })
    }

    /// `GET` a text body.
    pub async fn get_text(&mut self, path: &str) -> Result<String, ClientError> {
        let reply = self.call(Method::GET, path, None).await?;
        Ok(String::from_utf8_lossy(&reply.body).into_owned())
    }

    /// `PUT` or `PATCH` a JSON body.
    pub async fn send<T: Serialize>(
        &mut self,
        method: Method,
        path: &str,
        body: &T,
    ) -> Result<(), ClientError> {
        let body = serde_json::to_vec(body).map_err(|source| ClientError::Decode {
            path: path.to_owned(),
            source,
        })?;
        self.call(method, path, Some(body)).await.map(|_| ())
    }
}
