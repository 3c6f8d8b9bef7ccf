//! `spiffe_broker.v1.RelyingParty`: the revocation feed for relying parties.

use tonic::{Request, Response, Status};

use super::convert;
use super::{stream, Api, Call, PbStream};
use crate::broker::FeedItem;
use crate::error::to_status;
use crate::proto::v1 as pb;

#[tonic::async_trait]
impl pb::relying_party_server::RelyingParty for Api {
    type WatchRevocationsStream = PbStream<pb::RevocationFeedMessage>;

    async fn watch_revocations(
        &self,
        request: Request<pb::WatchRevocationsRequest>,
    ) -> Result<Response<Self::WatchRevocationsStream>, Status> {
        use pb::revocation_feed_message::Item;
        let call = Call::of(&request)?;
        let rx = self
            .broker
            .watch_revocations(&call.caller, request.get_ref().since, call.take_admission())
            .await
            .map_err(to_status)?;
        Ok(stream(rx, |item| pb::RevocationFeedMessage {
            item: Some(match item {
                FeedItem::Event(e) => Item::Event(convert::revocation_to_pb(&e)),
                FeedItem::Head(note) => Item::SignedHead(note),
            }),
        }))
    }
}
