#!/usr/bin/env python3
# A reflection-only gRPC client (grpcio speaks reflection v1alpha): list the services, then call
# Admin/Stats and Admin/ListNodes with descriptors fetched from the server, no .proto files.
import sys, grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from google.protobuf.descriptor_pool import DescriptorPool
from google.protobuf.message_factory import GetMessageClass
ch = grpc.insecure_channel(sys.argv[1])
db = ProtoReflectionDescriptorDatabase(ch)
services = db.get_services()
print("services:", ", ".join(sorted(services)))
pool = DescriptorPool(db)
svc = pool.FindServiceByName("invalbus.admin.v1.Admin")
for name in ("Stats", "ListNodes"):
    m = svc.FindMethodByName(name)
    req, resp = GetMessageClass(m.input_type), GetMessageClass(m.output_type)
    call = ch.unary_unary(f"/{svc.full_name}/{name}", request_serializer=req.SerializeToString, response_deserializer=resp.FromString)
    out = call(req())
    print(name, "->", str(out).replace("\n", " ")[:300])
