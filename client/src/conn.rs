//! A connection to a node as every call uses it: a tonic channel that adds
//! the bearer token (`authorization: Bearer <token>`) to each request.

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::error::{Error, Result};

/// A connection to a node that sends the bearer token with every call.
pub(crate) type Conn = InterceptedService<Channel, Token>;

/// Adds `authorization: Bearer <token>` to every call (when there is one).
#[derive(Clone)]
pub(crate) struct Token(Option<MetadataValue<Ascii>>);

impl Token {
    pub(crate) fn new(token: Option<&str>) -> Result<Token> {
        token
            .map(|t| {
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| Error::InvalidArgument("the token must be printable ASCII".into()))
            })
            .transpose()
            .map(Token)
    }
}

impl tonic::service::Interceptor for Token {
    fn call(
        &mut self,
        mut req: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}
