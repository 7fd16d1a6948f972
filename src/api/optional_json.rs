//! [`OptionalJson`]: a JSON request body that may be left out altogether.

use poem::{Request, RequestBody};
use poem_openapi::{
    ApiExtractor, ApiExtractorType, ExtractParamOptions,
    error::ContentTypeError,
    payload::Json,
    registry::{MetaRequest, Registry},
    types::ParseFromJSON,
};

/// A JSON body declared optional (`required: false`): a request without a body, and so
/// without a `Content-Type`, reads as `None`, as a generated client sends it when the caller
/// gives nothing. A body sent without a `Content-Type` is still a 415, and a JSON body (an empty
/// one included) reads as [`Json`] reads it.
pub struct OptionalJson<T>(pub Option<T>);

impl<'a, T: ParseFromJSON> ApiExtractor<'a> for OptionalJson<T> {
    const TYPES: &'static [ApiExtractorType] = &[ApiExtractorType::RequestObject];

    type ParamType = ();
    type ParamRawType = ();

    fn register(registry: &mut Registry) {
        <Json<Option<T>> as ApiExtractor>::register(registry);
    }

    fn request_meta() -> Option<MetaRequest> {
        <Json<Option<T>> as ApiExtractor>::request_meta()
    }

    async fn from_request(
        request: &'a Request,
        body: &mut RequestBody,
        param_opts: ExtractParamOptions<Self::ParamType>,
    ) -> poem::Result<Self> {
        if request.content_type().is_some() {
            let Json(value) =
                <Json<Option<T>> as ApiExtractor>::from_request(request, body, param_opts).await?;
            return Ok(Self(value));
        }
        let bytes = body.take()?.into_bytes().await?;
        if bytes.is_empty() {
            Ok(Self(None))
        } else {
            Err(ContentTypeError::ExpectContentType.into())
        }
    }
}
